//! Percent-encoding of URL path segments: everything but RFC 3986's
//! unreserved characters. One implementation for model ids placed in paths
//! and for SigV4's canonical URIs, which must agree byte for byte.

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// Appends `bytes` to `out`, percent-encoded.
pub fn percent_encode_into(bytes: &[u8], out: &mut String) {
    for &b in bytes {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 15)]));
        }
    }
}

/// `s` percent-encoded, for one URL path segment (Bedrock ids carry ':'
/// and ARNs '/').
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    percent_encode_into(s.as_bytes(), &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unreserved_characters_stay() {
        assert_eq!(percent_encode("aZ09-_.~"), "aZ09-_.~");
        assert_eq!(percent_encode("a b:/@%é"), "a%20b%3A%2F%40%25%C3%A9");
    }
}
