//! Word splitting shared by the text apps.
//!
//! A word is a maximal run of Unicode letters (`char::is_alphabetic`), case kept. ASCII is
//! classified with a table; other bytes are decoded as UTF-8, and an invalid sequence counts
//! as one non-letter byte.

/// `ASCII_LETTER[b]` is true for `A-Z` and `a-z`.
static ASCII_LETTER: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = (b >= b'A' as usize && b <= b'Z' as usize)
            || (b >= b'a' as usize && b <= b'z' as usize);
        b += 1;
    }
    table
};

/// Decodes the non-ASCII character starting at `text[0]`: its byte length and whether it is
/// a letter. Invalid UTF-8 is one non-letter byte.
#[inline(never)]
fn decode_non_ascii(text: &[u8]) -> (usize, bool) {
    let len = match text[0] {
        0xC2..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF4 => 4,
        _ => return (1, false),
    };
    match text.get(..len).map(std::str::from_utf8) {
        Some(Ok(s)) => (len, s.chars().next().is_some_and(char::is_alphabetic)),
        _ => (1, false),
    }
}

/// Calls `f` for every word of `text`, in order.
#[inline]
pub fn for_each_word<'a>(text: &'a [u8], mut f: impl FnMut(&'a [u8])) {
    let n = text.len();
    let mut i = 0;
    loop {
        // Skip non-letters.
        let start = loop {
            if i >= n {
                return;
            }
            let b = text[i];
            if b < 0x80 {
                if ASCII_LETTER[b as usize] {
                    break i;
                }
                i += 1;
            } else {
                let (len, letter) = decode_non_ascii(&text[i..]);
                if letter {
                    break i;
                }
                i += len;
            }
        };
        // Scan letters.
        loop {
            if i >= n {
                f(&text[start..]);
                return;
            }
            let b = text[i];
            if b < 0x80 {
                if !ASCII_LETTER[b as usize] {
                    break;
                }
                i += 1;
            } else {
                let (len, letter) = decode_non_ascii(&text[i..]);
                if !letter {
                    break;
                }
                i += len;
            }
        }
        f(&text[start..i]);
        // text[i] is a non-letter: the skip loop starts there.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &[u8]) -> Vec<String> {
        let mut v = Vec::new();
        for_each_word(text, |w| v.push(String::from_utf8_lossy(w).into_owned()));
        v
    }

    #[test]
    fn splits_on_non_letters() {
        assert_eq!(
            words(b"Hello, world! it's 42x"),
            ["Hello", "world", "it", "s", "x"]
        );
        assert_eq!(words(b""), Vec::<String>::new());
        assert_eq!(words(b"  ..  "), Vec::<String>::new());
        assert_eq!(words(b"abc"), ["abc"]);
    }

    #[test]
    fn unicode_letters_and_invalid_bytes() {
        let text = "Caf\u{e9} na\u{ef}ve \u{201c}quoted\u{201d} \u{3b1}\u{3b2}".as_bytes();
        assert_eq!(
            words(text),
            ["Caf\u{e9}", "na\u{ef}ve", "quoted", "\u{3b1}\u{3b2}"]
        );
        assert_eq!(words(b"ab\xffcd\xc3"), ["ab", "cd"]);
        assert_eq!(words(b"\xe2\x82"), Vec::<String>::new());
    }

    #[test]
    fn matches_a_char_based_reference() {
        let samples: [&[u8]; 4] = [
            "\u{e0}b\u{10000}c d\u{1d400}e".as_bytes(),
            b"x\x80y\xc0\xafz",
            "mix\u{2019}d \u{4e2d}\u{6587}!".as_bytes(),
            b"\xf4\x90\x80\x80a",
        ];
        for s in samples {
            let lossy = String::from_utf8_lossy(s);
            let reference: Vec<String> = lossy
                .split(|c: char| !c.is_alphabetic())
                .filter(|w| !w.is_empty())
                .map(str::to_owned)
                .collect();
            assert_eq!(words(s), reference, "{s:?}");
        }
    }
}
