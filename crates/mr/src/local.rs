//! Helpers for running a whole job on one machine (`shoal mr run`): the bundled books used
//! when no input is given.

use std::path::{Path, PathBuf};

/// The eight Project Gutenberg books of `testdata/gutenberg/` (see its `SOURCES.md`), embedded
/// so that `shoal mr run` works with no arguments on a fresh clone.
pub const BUNDLED_BOOKS: &[(&str, &[u8])] = &[
    (
        "pg-being_ernest.txt",
        include_bytes!("../../../testdata/gutenberg/pg-being_ernest.txt"),
    ),
    (
        "pg-dorian_gray.txt",
        include_bytes!("../../../testdata/gutenberg/pg-dorian_gray.txt"),
    ),
    (
        "pg-frankenstein.txt",
        include_bytes!("../../../testdata/gutenberg/pg-frankenstein.txt"),
    ),
    (
        "pg-grimm.txt",
        include_bytes!("../../../testdata/gutenberg/pg-grimm.txt"),
    ),
    (
        "pg-huckleberry_finn.txt",
        include_bytes!("../../../testdata/gutenberg/pg-huckleberry_finn.txt"),
    ),
    (
        "pg-metamorphosis.txt",
        include_bytes!("../../../testdata/gutenberg/pg-metamorphosis.txt"),
    ),
    (
        "pg-sherlock_holmes.txt",
        include_bytes!("../../../testdata/gutenberg/pg-sherlock_holmes.txt"),
    ),
    (
        "pg-tom_sawyer.txt",
        include_bytes!("../../../testdata/gutenberg/pg-tom_sawyer.txt"),
    ),
];

/// Writes the bundled books into `dir` and returns their paths.
pub fn write_bundled_books(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    BUNDLED_BOOKS
        .iter()
        .map(|(name, bytes)| {
            let path = dir.join(name);
            std::fs::write(&path, bytes)?;
            Ok(path)
        })
        .collect()
}

/// Reads `mr-out-*` files of wordcount-like output (`key count` lines) and returns the `n`
/// keys with the largest counts, largest first (ties by key).
pub fn top_counts(outputs: &[PathBuf], n: usize) -> std::io::Result<Vec<(String, u64)>> {
    let mut all: Vec<(String, u64)> = Vec::new();
    for path in outputs {
        let text = std::fs::read(path)?;
        for line in String::from_utf8_lossy(&text).lines() {
            if let Some((key, count)) = line.rsplit_once(' ') {
                if let Ok(count) = count.trim().parse::<u64>() {
                    all.push((key.to_string(), count));
                }
            }
        }
    }
    all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    all.truncate(n);
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn books_are_embedded_and_top_counts_sorts() {
        assert_eq!(BUNDLED_BOOKS.len(), 8);
        assert!(BUNDLED_BOOKS.iter().all(|(_, b)| b.len() > 100_000));
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("mr-out-0");
        std::fs::write(&f, "the 10\na 3\nzebra 10\nodd line\n").unwrap();
        assert_eq!(
            top_counts(&[f], 2).unwrap(),
            vec![("the".to_string(), 10), ("zebra".to_string(), 10)]
        );
    }
}
