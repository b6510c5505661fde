//! Input splitting.

use std::path::PathBuf;

use proptest::prelude::*;
use shoal_mr::split::{plan_splits, plan_splits_with, read_split, RecordLayout};

#[test]
fn missing_input_is_an_error_naming_the_file() {
    let err = plan_splits(&[PathBuf::from("/no/such/file.txt")], 1024)
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
    assert!(err.contains("/no/such/file.txt"), "{err}");
    let dir = tempfile::tempdir().expect("tempdir");
    let err = plan_splits(&[dir.path().to_path_buf()], 1024)
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
    assert!(err.contains("directory"), "{err}");
}

#[test]
fn empty_file_is_one_empty_split_and_lines_stay_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let empty = dir.path().join("empty");
    std::fs::write(&empty, b"").expect("write");
    let text = dir.path().join("text");
    std::fs::write(&text, b"aaaa\nbbbbbbbbbbbb\ncc\n").expect("write");
    let splits = plan_splits(&[empty.clone(), text.clone()], 3).expect("plan");
    assert_eq!(splits[0].path, empty);
    assert_eq!(splits[0].len, 0);
    let pieces: Vec<Vec<u8>> = splits[1..]
        .iter()
        .map(|s| read_split(s).expect("read"))
        .collect();
    assert_eq!(
        pieces,
        [
            b"aaaa\n".to_vec(),
            b"bbbbbbbbbbbb\n".to_vec(),
            b"cc\n".to_vec()
        ]
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn splits_partition_the_file_into_whole_lines(
        lines in proptest::collection::vec("[a-z]{0,20}", 0..40),
        trailing_newline in any::<bool>(),
        split_size in 1u64..64,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut text = lines.join("\n");
        if trailing_newline && !text.is_empty() {
            text.push('\n');
        }
        let path = dir.path().join("f");
        std::fs::write(&path, text.as_bytes()).expect("write");
        let splits = plan_splits(std::slice::from_ref(&path), split_size).expect("plan");
        prop_assert!(!splits.is_empty());
        let mut concat = Vec::new();
        let mut next_offset = 0;
        let mut line_count = 0;
        for s in &splits {
            prop_assert_eq!(s.offset, next_offset);
            next_offset += s.len;
            let piece = read_split(s).expect("read");
            // Each split starts at a line start and ends after a newline (or at EOF).
            prop_assert!(s.offset == 0 || text.as_bytes()[s.offset as usize - 1] == b'\n');
            prop_assert!(piece.is_empty() || piece.ends_with(b"\n") || next_offset == text.len() as u64);
            if !piece.is_empty() {
                line_count += piece.split(|&b| b == b'\n').count() - usize::from(piece.ends_with(b"\n"));
            }
            concat.extend_from_slice(&piece);
        }
        prop_assert_eq!(&concat, text.as_bytes());
        let expected_lines = if text.is_empty() { 0 } else {
            text.split('\n').count() - usize::from(text.ends_with('\n'))
        };
        prop_assert_eq!(line_count, expected_lines);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Fixed-size records (TeraSort): splits never cut a record, whatever the split size, and
    /// together they are the file; a file that is not whole records is refused.
    #[test]
    fn fixed_record_splits_fall_on_record_boundaries(
        records in 0usize..50,
        record_bytes in 1u64..120,
        split_size in 1u64..1000,
        seed in any::<u8>(),
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let data: Vec<u8> = (0..records as u64 * record_bytes)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect();
        let path = dir.path().join("f");
        std::fs::write(&path, &data).expect("write");
        let layout = RecordLayout::Fixed(record_bytes);
        let splits = plan_splits_with(std::slice::from_ref(&path), split_size, layout).expect("plan");
        let mut concat = Vec::new();
        for s in &splits {
            prop_assert_eq!(s.offset % record_bytes, 0);
            prop_assert_eq!(s.len % record_bytes, 0);
            prop_assert!(records == 0 || s.len >= record_bytes);
            prop_assert_eq!(s.offset, concat.len() as u64);
            concat.extend_from_slice(&read_split(s).expect("read"));
        }
        prop_assert_eq!(&concat, &data);
        if record_bytes > 1 && records > 0 {
            std::fs::write(&path, &data[..data.len() - 1]).expect("write");
            let err = plan_splits_with(std::slice::from_ref(&path), split_size, layout)
                .err()
                .map(|e| format!("{e:#}"))
                .unwrap_or_default();
            prop_assert!(err.contains("not a whole number"), "{}", err);
        }
    }
}
