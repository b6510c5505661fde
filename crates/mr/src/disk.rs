//! Disk errors that retrying cannot fix, and messages that name the directory and the way out.
//!
//! A task that fails because its disk is full, read-only or not writable fails the same way
//! on every retry; worse, retries that leave partial files behind make a full disk fuller. Such
//! errors fail the job at once with a message a person can act on, instead of counting toward
//! `--max-attempts` like an app's error.

use std::io;
use std::path::Path;

/// Whether retrying an operation that failed with `e` cannot help: no space (`ENOSPC`), over
/// quota (`EDQUOT`), read-only file system (`EROFS`), or permission denied (`EACCES`,
/// `EPERM`).
pub fn is_unrecoverable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSPC | libc::EDQUOT | libc::EROFS | libc::EACCES | libc::EPERM)
    )
}

/// The first [`io::Error`] in an error's chain that retrying cannot fix, if any.
pub fn unrecoverable_cause<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a io::Error> {
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            if is_unrecoverable(io) {
                return Some(io);
            }
        }
        next = err.source();
    }
    None
}

/// The system's description of `e` without Rust's ` (os error N)` suffix: "No space left on
/// device".
pub fn reason(e: &io::Error) -> String {
    let text = e.to_string();
    match text.rfind(" (os error ") {
        Some(i) if text.ends_with(')') => text[..i].to_string(),
        _ => text,
    }
}

/// "output directory /mnt/out is full (No space left on device): free space or choose another
/// --out": what went wrong with `dir` (described as `what`), and the `flag` that moves it.
pub fn describe(what: &str, dir: &Path, flag: &str, e: &io::Error) -> String {
    let dir = dir.display();
    let why = reason(e);
    match e.raw_os_error() {
        Some(libc::ENOSPC | libc::EDQUOT) => {
            format!("{what} {dir} is full ({why}): free space or choose another {flag}")
        }
        Some(libc::EROFS) => format!("{what} {dir} is read-only ({why}): choose another {flag}"),
        Some(libc::EACCES | libc::EPERM) => format!(
            "{what} {dir} is not writable ({why}): fix its permissions or choose another {flag}"
        ),
        _ => format!("{what} {dir}: {why}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_read_only_and_denied_are_unrecoverable_and_named() {
        let full = io::Error::from_raw_os_error(libc::ENOSPC);
        assert!(is_unrecoverable(&full));
        assert_eq!(
            describe("output directory", Path::new("/mnt/a/out"), "--out", &full),
            "output directory /mnt/a/out is full (No space left on device): free space or \
             choose another --out"
        );
        let ro = io::Error::from_raw_os_error(libc::EROFS);
        assert!(describe("output directory", Path::new("/o"), "--out", &ro).contains("read-only"));
        assert!(is_unrecoverable(&io::Error::from_raw_os_error(
            libc::EACCES
        )));
        assert!(!is_unrecoverable(&io::Error::from_raw_os_error(
            libc::ECONNREFUSED
        )));
        assert!(!is_unrecoverable(&io::Error::other("not an OS error")));
        let chained = anyhow::Error::new(full).context("spilling");
        let root: &(dyn std::error::Error + 'static) = chained.as_ref();
        assert!(unrecoverable_cause(root).is_some());
    }
}
