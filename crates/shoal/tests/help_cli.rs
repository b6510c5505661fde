//! `--help` as a user sees it: examples come out whole whatever the terminal width says.

use std::process::Command;

fn help(columns: &str, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(args)
        .arg("--help")
        .env("COLUMNS", columns)
        .output()
        .expect("run shoal");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 help")
}

#[test]
fn examples_are_not_wrapped_under_a_narrow_columns() {
    for columns in ["60", "80", "100"] {
        let text = help(columns, &["kv", "server"]);
        // Each three-server example is one line, from `shoal` to its `--data`.
        let examples: Vec<&str> = text
            .lines()
            .filter(|l| l.trim_start().starts_with("shoal kv server --id"))
            .filter(|l| !l.contains("--join"))
            .collect();
        assert_eq!(examples.len(), 3, "COLUMNS={columns}:\n{text}");
        // The joining server's example too.
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with("shoal kv server --id 4")
                    && l.contains("--join")
                    && l.contains("--data n4")),
            "COLUMNS={columns}:\n{text}"
        );
        assert!(
            examples
                .iter()
                .all(|l| l.contains("--peers 1=") && l.contains("--data n")),
            "COLUMNS={columns}:\n{text}"
        );

        let text = help(columns, &["check"]);
        assert!(
            text.contains(
                "\n  2  unknown: --budget or --max-memory ran out before the search finished\n"
            ),
            "COLUMNS={columns}:\n{text}"
        );
    }
}

/// `kv server` and `kv up` list only the options that apply to them, not the client commands'.
#[test]
fn servers_list_and_take_only_their_own_options() {
    for sub in ["server", "up"] {
        let text = help("100", &["kv", sub]);
        for client_only in ["--endpoints", "--timeout", "--serializable"] {
            assert!(
                !text.contains(client_only),
                "kv {sub} --help lists {client_only}:\n{text}"
            );
        }
    }
    let text = help("100", &["kv", "get"]);
    assert!(
        text.contains("--endpoints") && text.contains("--timeout"),
        "{text}"
    );
}
