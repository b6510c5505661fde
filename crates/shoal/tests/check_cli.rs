//! `shoal check` as a user runs it: exit codes, messages, --html.

use std::path::PathBuf;
use std::process::{Command, Output};

fn shoal(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(args)
        .output()
        .expect("run shoal")
}

fn testdata(path: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/linearizability")
        .join(path)
        .display()
        .to_string()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn linearizable_history_exits_0() {
    let out = shoal(&[
        "check",
        "--format",
        "jepsen-etcd",
        &testdata("jepsen-etcd/etcd_002.log"),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("linearizable: "),
        "{}",
        stdout(&out)
    );
}

#[test]
fn violation_exits_1_and_explains() {
    let out = shoal(&[
        "check",
        "--format",
        "jepsen-etcd",
        &testdata("jepsen-etcd/etcd_000.log"),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("not linearizable: "), "{text}");
    assert!(text.contains("longest linearizable prefix"), "{text}");
    assert!(text.contains("cannot be linearized"), "{text}");
}

#[test]
fn kv_violation_names_the_key() {
    let out = shoal(&[
        "check",
        "--format",
        "jepsen-kv",
        &testdata("kv/c10-bad.txt"),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("partition: key \""),
        "{}",
        stdout(&out)
    );
    let json = shoal(&[
        "check",
        "--format",
        "jepsen-kv",
        "-o",
        "json",
        &testdata("kv/c10-bad.txt"),
    ]);
    assert_eq!(json.status.code(), Some(1), "{}", stderr(&json));
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("one JSON document");
    assert_eq!(v["verdict"], "not-linearizable", "{v}");
    assert!(v["operations"].as_u64().unwrap_or(0) > 0 && v["keys"].as_u64().unwrap_or(0) > 0);
    assert!(v["explanation"]
        .as_str()
        .unwrap_or("")
        .contains("partition: key \""));
    let ok = shoal(&["check", "--format", "jepsen-kv", &testdata("kv/c10-ok.txt")]);
    assert_eq!(ok.status.code(), Some(0), "{}", stderr(&ok));
}

#[test]
fn exhausted_budget_exits_2_with_unknown() {
    let out = shoal(&[
        "check",
        "--format",
        "jepsen-kv",
        "--no-partition",
        "--budget",
        "0.000001",
        &testdata("kv/c50-ok.txt"),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("unknown"), "{}", stdout(&out));
}

#[test]
fn malformed_line_names_file_and_line_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("history.log");
    std::fs::write(
        &path,
        "INFO  jepsen.util - 1\t:invoke\t:write\t1\n\
         INFO  jepsen.util - 1\t:ok\t:write\t1\n\
         INFO  jepsen.util - 2\t:invoke\t:frobnicate\t1\n",
    )
    .unwrap();
    let out = shoal(&["check", "--format", "jepsen-etcd", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains(&format!("{}:3:", path.display())), "{err}");
    assert!(err.contains("expected :read, :write or :cas"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    let json = dir.path().join("history.jsonl");
    std::fs::write(
        &json,
        "{\"client\": 1, \"type\": \"invoke\", \"f\": \"get\", \"key\": \"a\"}\nnot json\n",
    )
    .unwrap();
    let out = shoal(&["check", "--format", "json", json.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains(&format!("{}:2:", json.display())),
        "{}",
        stderr(&out)
    );
}

#[test]
fn missing_file_exits_2() {
    let out = shoal(&["check", "--format", "json", "/nonexistent/history.jsonl"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("/nonexistent/history.jsonl"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn html_writes_a_self_contained_page() {
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("timeline.html");
    let out = shoal(&[
        "check",
        "--format",
        "jepsen-kv",
        "--html",
        page.to_str().unwrap(),
        &testdata("kv/c01-bad.txt"),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let html = std::fs::read_to_string(&page).expect("page written");
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(html.contains("class=\"op"), "bars");
    assert!(
        html.contains("blocked"),
        "the blocked operation is highlighted"
    );
    assert!(
        !html.contains("src=") && !html.contains("href="),
        "no external assets"
    );
}

#[test]
fn json_versioned_kv_histories() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.jsonl");
    std::fs::write(
        &good,
        r#"{"client": 1, "type": "invoke", "f": "put", "key": "a", "value": "x", "expected": 0}
{"client": 2, "type": "invoke", "f": "get", "key": "a"}
{"client": 2, "type": "no-key"}
{"client": 1, "type": "ok", "version": 1}
{"client": 3, "type": "invoke", "f": "put", "key": "a", "value": "y", "expected": 1}
{"client": 3, "type": "maybe"}
{"client": 2, "type": "invoke", "f": "get", "key": "a"}
{"client": 2, "type": "ok", "value": "y", "version": 2}
"#,
    )
    .unwrap();
    let out = shoal(&["check", "--format", "json", good.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );

    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        r#"{"client": 1, "type": "invoke", "f": "put", "key": "a", "value": "x", "expected": 0}
{"client": 1, "type": "ok", "version": 1}
{"client": 2, "type": "invoke", "f": "get", "key": "a"}
{"client": 2, "type": "no-key"}
"#,
    )
    .unwrap();
    let out = shoal(&[
        "check",
        "--format",
        "json",
        "--quiet",
        bad.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).is_empty(), "--quiet prints nothing");

    let register = dir.path().join("register.jsonl");
    std::fs::write(
        &register,
        r#"{"client": 1, "type": "invoke", "f": "write", "value": 3}
{"client": 1, "type": "ok"}
{"client": 2, "type": "invoke", "f": "cas", "from": 3, "to": 4}
{"client": 2, "type": "fail"}
"#,
    )
    .unwrap();
    let out = shoal(&[
        "check",
        "--format",
        "json",
        "--model",
        "register",
        register.to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a cas of 3 after write 3 cannot fail"
    );
}

#[test]
fn help_teaches_formats_and_exit_codes() {
    let out = shoal(&["check", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    for needle in [
        "jepsen-etcd",
        "jepsen-kv",
        "json",
        "EXIT CODES",
        "unknown outcome",
        "--budget",
    ] {
        assert!(text.contains(needle), "--help lacks {needle}:\n{text}");
    }
}

#[test]
fn a_closed_stdout_is_not_a_panic() {
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args([
            "check",
            "--format",
            "jepsen-kv",
            &testdata("kv/c50-bad.txt"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run shoal");
    drop(child.stdout.take()); // like `shoal check ... | head -1` exiting early
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(1));
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
}

#[test]
fn verdict_line_counts_operations_and_keys() {
    let out = shoal(&["check", "--format", "jepsen-kv", &testdata("kv/c50-ok.txt")]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = read_testdata("kv/c50-ok.txt");
    let operations = text.matches(":type :invoke").count();
    let keys: std::collections::BTreeSet<&str> = text
        .lines()
        .filter_map(|line| line.split(":key ").nth(1)?.split(',').next())
        .collect();
    assert!(operations > 1000 && keys.len() > 1, "{operations} {keys:?}");
    assert_eq!(
        stdout(&out),
        format!(
            "linearizable: {},{:03} operations on {} keys\n",
            operations / 1000,
            operations % 1000,
            keys.len()
        )
    );

    // A violation and a register history (one key) say what they covered too.
    let bad = shoal(&[
        "check",
        "--format",
        "jepsen-etcd",
        &testdata("jepsen-etcd/etcd_000.log"),
    ]);
    assert_eq!(bad.status.code(), Some(1), "{}", stderr(&bad));
    let first = stdout(&bad).lines().next().unwrap_or_default().to_string();
    assert!(
        first.starts_with("not linearizable: ") && first.ends_with(" operations on 1 key"),
        "{first}"
    );
}

fn read_testdata(path: &str) -> String {
    std::fs::read_to_string(testdata(path)).expect("bundled history")
}

#[test]
fn a_file_of_another_format_is_an_error_naming_file_and_line() {
    // A jepsen-kv history read as jepsen-etcd used to be skipped line by line and pass as an
    // empty, linearizable history (exit 0).
    let path = testdata("kv/c10-ok.txt");
    let out = shoal(&["check", "--format", "jepsen-etcd", &path]);
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(err.contains(&format!("{path}:1: ")), "{err}");
    assert!(err.contains("Jepsen log line"), "{err}");
    assert!(!stdout(&out).contains("linearizable"), "{}", stdout(&out));

    // And the other way round, and JSON read as Jepsen kv.
    let out = shoal(&[
        "check",
        "--format",
        "jepsen-kv",
        &testdata("jepsen-etcd/etcd_002.log"),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("etcd_002.log:1: "),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_history_without_operations_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("empty.log", "", "jepsen-etcd"),
        ("blank.txt", "\n\n", "jepsen-kv"),
        ("comments.jsonl", "# nothing recorded\n", "json"),
        (
            "nemesis.log",
            "INFO  jepsen.util - :nemesis\t:info\t:start\tnil\n",
            "jepsen-etcd",
        ),
    ];
    for (name, text, format) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let out = shoal(&["check", "--format", format, path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{name}: {}", stdout(&out));
        let err = stderr(&out);
        assert!(
            err.contains(&format!(
                "no operations found in {}: wrong --format?",
                path.display()
            )),
            "{name}: {err}"
        );
        assert!(stdout(&out).is_empty(), "{name}: {}", stdout(&out));
    }
}

#[test]
fn space_separated_bundled_etcd_logs_are_checked_not_skipped() {
    // etcd_100.log separates its fields with spaces; it used to be read as zero operations.
    let out = shoal(&[
        "check",
        "--format",
        "jepsen-etcd",
        &testdata("jepsen-etcd/etcd_100.log"),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let invokes = read_testdata("jepsen-etcd/etcd_100.log")
        .matches(":invoke")
        .count();
    assert!(invokes > 50);
    assert_eq!(
        stdout(&out),
        format!("linearizable: {invokes} operations on 1 key\n")
    );
}

#[test]
fn html_on_a_linearizable_history_says_no_timeline_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("ok.html");
    let out = shoal(&[
        "check",
        "--format",
        "jepsen-kv",
        "--html",
        page.to_str().unwrap(),
        &testdata("kv/c01-ok.txt"),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!(
            "history is linearizable: no timeline written to {}",
            page.display()
        )),
        "{}",
        stdout(&out)
    );
    assert!(!page.exists());
}
