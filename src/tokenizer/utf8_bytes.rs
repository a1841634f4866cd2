//! UTF-8 decoding of byte-fallback pieces, one character at a time, with sentencepiece's rule for
//! bad input: each byte that does not start a valid character becomes one U+FFFD. (This differs
//! from `String::from_utf8_lossy`, which uses one U+FFFD per maximal invalid subsequence.)

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ByteChar {
    /// A valid character and how many bytes it used.
    Valid(char, usize),
    /// The first byte is not the start of a valid character; it alone is consumed.
    Invalid,
}

fn is_trail(b: u8) -> bool {
    b & 0xC0 == 0x80
}

/// Decodes the character at the start of `bytes` (which must not be empty). Returns `None` when the
/// bytes so far are too few to decide and more may still come (`end_of_run` false).
pub(crate) fn next_char(bytes: &[u8], end_of_run: bool) -> Option<ByteChar> {
    let b0 = *bytes.first()?;
    let (needed, min, lead_bits) = match b0 {
        0x00..=0x7F => return Some(ByteChar::Valid(b0 as char, 1)),
        _ if b0 & 0xE0 == 0xC0 => (2, 0x80, u32::from(b0 & 0x1F)),
        _ if b0 & 0xF0 == 0xE0 => (3, 0x800, u32::from(b0 & 0x0F)),
        _ if b0 & 0xF8 == 0xF0 => (4, 0x10000, u32::from(b0 & 0x07)),
        _ => return Some(ByteChar::Invalid),
    };
    if bytes.len() < needed {
        return end_of_run.then_some(ByteChar::Invalid);
    }
    let tail = &bytes[1..needed];
    if !tail.iter().all(|&b| is_trail(b)) {
        return Some(ByteChar::Invalid);
    }
    let cp = tail.iter().fold(lead_bits, |cp, &b| cp << 6 | u32::from(b & 0x3F));
    // `char::from_u32` rejects surrogates and values above U+10FFFF, as `IsValidCodepoint` does.
    match char::from_u32(cp) {
        Some(c) if cp >= min => Some(ByteChar::Valid(c, needed)),
        _ => Some(ByteChar::Invalid),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(bytes: &[u8]) -> String {
        let mut out = String::new();
        let mut i = 0;
        while i < bytes.len() {
            match next_char(&bytes[i..], true).unwrap() {
                ByteChar::Valid(c, n) => {
                    out.push(c);
                    i += n;
                }
                ByteChar::Invalid => {
                    out.push('\u{FFFD}');
                    i += 1;
                }
            }
        }
        out
    }

    #[test]
    fn valid_sequences_decode() {
        assert_eq!(decode_all("aé中🙂".as_bytes()), "aé中🙂");
    }

    #[test]
    fn each_bad_byte_is_one_replacement() {
        // Truncated 3-byte sequence then ASCII: two bad bytes, two replacements.
        assert_eq!(decode_all(&[0xE4, 0xB8, b'a']), "\u{FFFD}\u{FFFD}a");
        // Overlong and surrogate encodings are rejected byte by byte.
        assert_eq!(decode_all(&[0xC0, 0x80]), "\u{FFFD}\u{FFFD}");
        assert_eq!(decode_all(&[0xED, 0xA0, 0x80]), "\u{FFFD}\u{FFFD}\u{FFFD}");
    }

    #[test]
    fn incomplete_sequences_wait_for_more_bytes() {
        assert_eq!(next_char(&[0xF0, 0x9F], false), None);
        assert_eq!(next_char(&[0xF0, 0x9F], true), Some(ByteChar::Invalid));
    }
}
