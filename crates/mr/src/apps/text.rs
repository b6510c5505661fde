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

/// High bit of every byte.
const HIGH_BITS: u64 = 0x8080_8080_8080_8080;
/// `0x01` in every byte.
const ONES: u64 = 0x0101_0101_0101_0101;

/// Bit 7 of byte j is set iff byte j of `w` (all bytes ASCII) is an ASCII letter: fold case
/// with `| 0x20`, then test `0x61 <= x <= 0x7a` per byte with carry-free additions.
#[inline(always)]
fn ascii_letter_mask(w: u64) -> u64 {
    let x = w | (0x20 * ONES);
    let at_least_a = x + (0x80 - 0x61) * ONES;
    let above_z = x + (0x80 - 0x7b) * ONES;
    at_least_a & !above_z & HIGH_BITS
}

/// Calls `f` for every word of `text`, in order.
///
/// Eight ASCII bytes at a time (SWAR): a mask of letter bytes gives word starts and ends
/// directly; a chunk holding a non-ASCII byte is decoded character by character.
#[inline]
pub fn for_each_word<'a>(text: &'a [u8], mut f: impl FnMut(&'a [u8])) {
    let n = text.len();
    let mut i = 0;
    let mut in_word = false;
    let mut start = 0;
    while i + 8 <= n {
        let mut chunk = [0u8; 8];
        chunk.copy_from_slice(&text[i..i + 8]);
        let w = u64::from_le_bytes(chunk);
        if w & HIGH_BITS != 0 {
            // Slow path up to the end of this chunk (a character may run past it).
            let end = i + 8;
            while i < end {
                i = step(text, i, &mut in_word, &mut start, &mut f);
            }
            continue;
        }
        let m = ascii_letter_mask(w);
        let before = (m << 8) | if in_word { 0x80 } else { 0 };
        let starts = m & !before;
        let ends = !m & before & HIGH_BITS;
        let mut events = starts | ends;
        while events != 0 {
            let bit = events.trailing_zeros();
            let pos = i + (bit / 8) as usize;
            if starts & (1u64 << bit) != 0 {
                start = pos;
            } else {
                f(&text[start..pos]);
            }
            events &= events - 1;
        }
        in_word = m >> 63 != 0;
        i += 8;
    }
    while i < n {
        i = step(text, i, &mut in_word, &mut start, &mut f);
    }
    if in_word {
        f(&text[start..]);
    }
}

/// Classifies the character at `text[i]`, updates the word state, returns the next position.
#[inline]
fn step<'a>(
    text: &'a [u8],
    i: usize,
    in_word: &mut bool,
    start: &mut usize,
    f: &mut impl FnMut(&'a [u8]),
) -> usize {
    let b = text[i];
    let (len, letter) = if b < 0x80 {
        (1, ASCII_LETTER[b as usize])
    } else {
        decode_non_ascii(&text[i..])
    };
    if letter && !*in_word {
        *start = i;
        *in_word = true;
    } else if !letter && *in_word {
        f(&text[*start..i]);
        *in_word = false;
    }
    i + len
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

    fn reference(s: &[u8]) -> Vec<String> {
        String::from_utf8_lossy(s)
            .split(|c: char| !c.is_alphabetic())
            .filter(|w| !w.is_empty())
            .map(str::to_owned)
            .collect()
    }

    proptest::proptest! {
        #[test]
        fn swar_matches_the_reference_on_random_text(
            pieces in proptest::collection::vec(
                proptest::prop_oneof![
                    "[a-zA-Z]{1,12}",
                    "[ .,;\\n0-9@\\[`{]{1,3}",
                    "[\u{e0}-\u{ff}\u{3b1}-\u{3c9}\u{2018}-\u{201d}\u{4e00}-\u{4e10}]{1,3}",
                ],
                0..40,
            ),
            junk in proptest::collection::vec(proptest::num::u8::ANY, 0..4),
            junk_at in 0usize..200,
        ) {
            let mut s = pieces.concat().into_bytes();
            let at = junk_at.min(s.len());
            s.splice(at..at, junk);
            proptest::prop_assert_eq!(words(&s), reference(&s));
        }
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
