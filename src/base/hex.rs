//! Lowercase hex, and one strict decoder for every hex the library reads
//! back (checksums, keys, signatures, descriptor bytes in the journal).
use super::error::{Error, Result};

const DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Lowercase hex of bytes.
pub fn encode(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

fn digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Decodes hex (either case); an odd length or a non-hex digit is an error
/// naming `what` and the offending position.
pub fn decode(text: &str, what: &str) -> Result<Vec<u8>> {
    let bytes = text.as_bytes();
    if bytes.len() % 2 != 0 {
        return Err(Error::malformed(format!("{what} is not hex: odd length {}", bytes.len())));
    }
    bytes
        .chunks(2)
        .enumerate()
        .map(|(i, pair)| match (digit(pair[0]), digit(pair[1])) {
            (Some(hi), Some(lo)) => Ok(hi << 4 | lo),
            _ => Err(Error::malformed(format!("{what} is not hex: bad digit at position {}", 2 * i))),
        })
        .collect()
}

/// Decodes exactly `N` bytes of hex.
pub fn decode_array<const N: usize>(text: &str, what: &str) -> Result<[u8; N]> {
    let bytes = decode(text, what)?;
    let len = bytes.len();
    bytes.try_into().map_err(|_| Error::malformed(format!("{what} is {len} bytes of hex, expected {N}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_bad_digits() {
        assert_eq!(encode(&[0x00, 0xab, 0xff]), "00abff");
        assert_eq!(decode("00abFF", "x").unwrap(), vec![0x00, 0xab, 0xff]);
        assert!(decode("abc", "x").unwrap_err().message().contains("odd length"));
        assert!(decode("zz", "x").unwrap_err().message().contains("position 0"));
        assert!(decode_array::<2>("00ab00", "key").unwrap_err().message().contains("expected 2"));
        assert_eq!(decode_array::<2>("00ab", "key").unwrap(), [0, 0xab]);
    }
}
