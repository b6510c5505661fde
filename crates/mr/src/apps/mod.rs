//! The built-in apps: `wordcount`, `indexer`, `grep`, `sort` (total-order sort of lines or
//! TeraSort records), `stream` (Hadoop-streaming style external commands), and the fault-testing apps of the classic lab (`mtiming`, `rtiming`,
//! `jobcount`, `early_exit`, `crash`, `nocrash`).
//!
//! Text apps get raw bytes. The UTF-8 rule: a word is a maximal run of Unicode letters
//! (`char::is_alphabetic`) decoded from valid UTF-8; an invalid byte sequence is treated as
//! one non-letter byte (it separates words and never appears in a key).

pub mod faults;
pub mod grep;
pub mod indexer;
pub mod sort;
pub mod stream;
pub mod text;
pub mod wordcount;

/// Parses an unsigned decimal integer (ASCII digits only, no sign, no spaces).
pub(crate) fn parse_decimal(bytes: &[u8]) -> Option<u64> {
    if bytes.is_empty() || bytes.len() > 20 {
        return None;
    }
    let mut n: u64 = 0;
    for &b in bytes {
        let digit = b.wrapping_sub(b'0');
        if digit > 9 {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(digit))?;
    }
    Some(n)
}

/// Appends `n` in decimal to `out`.
pub(crate) fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_round_trip() {
        for n in [0u64, 1, 9, 10, 12345, u64::MAX] {
            let mut v = Vec::new();
            push_decimal(&mut v, n);
            assert_eq!(parse_decimal(&v), Some(n));
            assert_eq!(v, n.to_string().as_bytes());
        }
        assert_eq!(parse_decimal(b""), None);
        assert_eq!(parse_decimal(b"1a"), None);
        assert_eq!(parse_decimal(b"-1"), None);
        assert_eq!(parse_decimal(b"99999999999999999999"), None);
    }
}
