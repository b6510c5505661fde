//! How `--help` is laid out.
//!
//! clap's `wrap_help` breaks every help line longer than the terminal (or `$COLUMNS`, or 100
//! columns when neither is known) with a real newline, after_help included. That is right for
//! prose but wrong for an example command: broken in the middle, it pastes as two broken
//! commands. A terminal's own soft wrap keeps a long line one line for copy and paste, so the
//! fix is to give clap one fixed width, no narrower than the widest example: examples then come
//! out verbatim on every terminal, through a pipe and under any `$COLUMNS`, and a narrower
//! terminal soft-wraps lines without changing them.

/// The width at which clap wraps help text, whatever the terminal.
///
/// It must be at least the longest verbatim line of any after_help (an example, or an indented
/// block such as `check --help`'s EXIT CODES); the test below fails otherwise. Today the longest
/// is 117 columns (the three-server examples of `kv server --help` and `raft node --help`).
pub const WIDTH: usize = 120;

/// Whether a line of an after_help text must come out verbatim: an example command (`shoal ...`)
/// or any indented line (examples, tables, the EXIT CODES of `check`). Unindented lines are prose
/// that clap may wrap.
#[cfg(test)]
fn is_verbatim(line: &str) -> bool {
    !line.trim().is_empty() && (line.starts_with(' ') || line.starts_with("shoal "))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use clap::CommandFactory as _;

    use super::{is_verbatim, WIDTH};
    use crate::Cli;

    /// Every subcommand path, `[]` (the top level) included.
    fn paths(cmd: &clap::Command, prefix: &[String], out: &mut Vec<Vec<String>>) {
        out.push(prefix.to_vec());
        for sub in cmd.get_subcommands() {
            let mut path = prefix.to_vec();
            path.push(sub.get_name().to_string());
            paths(sub, &path, out);
        }
    }

    fn find<'a>(mut cmd: &'a clap::Command, path: &[String]) -> &'a clap::Command {
        for name in path {
            cmd = cmd.find_subcommand(name).expect("a listed subcommand");
        }
        cmd
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn help_examples_and_indented_blocks_are_never_wrapped() {
        let root = Cli::command();
        let mut all = Vec::new();
        paths(&root, &[], &mut all);
        assert!(all.len() > 20, "{all:?}");
        let mut checked = 0;
        let mut failures = Vec::new();
        for path in &all {
            let cmd = find(&root, path);
            for flag in ["-h", "--help"] {
                // -h shows after_help; --help shows after_long_help, else after_help.
                let source = match flag {
                    "-h" => cmd.get_after_help(),
                    _ => cmd.get_after_long_help().or(cmd.get_after_help()),
                };
                let Some(source) = source.map(ToString::to_string) else {
                    continue;
                };
                let mut args = vec!["shoal".to_string()];
                args.extend(path.iter().cloned());
                args.push(flag.to_string());
                let shown = args[1..].join(" ");
                let err = Cli::command()
                    .try_get_matches_from(&args)
                    .expect_err("help is an early exit");
                assert_eq!(err.kind(), clap::error::ErrorKind::DisplayHelp, "{shown}");
                let rendered = err.render().to_string();
                let lines: BTreeSet<&str> = rendered.lines().map(str::trim_end).collect();
                for line in source.lines().filter(|l| is_verbatim(l)) {
                    if line.chars().count() > WIDTH {
                        failures.push(format!(
                            "`{shown}`: wider than help::WIDTH ({WIDTH}), shorten it (a `\\` \
                             continuation for a long command):\n{line}"
                        ));
                    } else if !lines.contains(line.trim_end()) {
                        failures.push(format!(
                            "`{shown}` wraps this line of its help:\n{line}\nrendered:\n{rendered}"
                        ));
                    }
                    checked += 1;
                }
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n\n"));
        assert!(checked > 50, "only {checked} verbatim lines found");
    }
}
