//! Provider keys out of streamed answers.
//!
//! A provider's error event may quote the key it was sent ("Incorrect API
//! key provided: sk-…"). Complete error replies are redacted where they are
//! rewritten (`exchange::translate_error`); streams are redacted here, in
//! what goes out to the caller, translated or not. Every translator and
//! watcher writes whole events only, so a key split across two upstream
//! chunks is whole in the output of the push that completes its event.
//!
//! The output is only searched for the keys' bytes (Horspool's search, which
//! mostly steps a key's length at a time); output without a key goes on
//! untouched and uncopied.

use crate::core::usage::Usage;
use crate::translate::StreamTranslator;

/// What a key is replaced with (as in complete error replies).
pub const REDACTED: &[u8] = b"[redacted]";

/// One byte string to find, with its bad-character shifts.
struct Needle {
    bytes: Vec<u8>,
    /// How far the search may move when a window ends with a given byte.
    shift: [usize; 256],
}

impl Needle {
    fn new(bytes: Vec<u8>) -> Option<Self> {
        let (_, init) = bytes.split_last()?;
        let mut shift = [bytes.len(); 256];
        for (i, &b) in init.iter().enumerate() {
            shift[usize::from(b)] = init.len() - i;
        }
        Some(Needle { bytes, shift })
    }

    /// The first occurrence in `hay` at or after `from`.
    fn find(&self, hay: &[u8], from: usize) -> Option<usize> {
        let n = self.bytes.len();
        let mut at = from;
        while let Some(window) = hay.get(at..at.saturating_add(n)) {
            let last = *window.last()?;
            if window == self.bytes.as_slice() {
                return Some(at);
            }
            at = at.saturating_add(self.shift[usize::from(last)]);
        }
        None
    }
}

/// A stream translator whose output never carries a provider key.
pub struct Scrubbed<T> {
    inner: T,
    /// Longest first, so a key that contains another goes whole.
    needles: Vec<Needle>,
}

impl<T: StreamTranslator> Scrubbed<T> {
    /// `secrets`: the provider's key(s); empty ones are ignored.
    pub fn new(inner: T, secrets: &[&str]) -> Self {
        let mut forms: Vec<Vec<u8>> = Vec::new();
        for secret in secrets.iter().filter(|s| !s.is_empty()) {
            forms.push(secret.as_bytes().to_vec());
            // JSON may escape `/` (AWS secret keys have them); events passed
            // on byte for byte keep the provider's escaping.
            if secret.contains('/') {
                forms.push(secret.replace('/', "\\/").into_bytes());
            }
        }
        forms.sort_by_key(|f| std::cmp::Reverse(f.len()));
        forms.dedup();
        Scrubbed {
            inner,
            needles: forms.into_iter().filter_map(Needle::new).collect(),
        }
    }

    /// Replaces every key in `out[from..]`.
    fn scrub(&self, out: &mut Vec<u8>, from: usize) {
        for needle in &self.needles {
            let Some(first) = needle.find(out, from) else {
                continue;
            };
            log::warn!("redacted the provider key from a streamed answer");
            let rest = out.split_off(first);
            let mut at = 0;
            while let Some(hit) = needle.find(&rest, at) {
                out.extend_from_slice(rest.get(at..hit).unwrap_or_default());
                out.extend_from_slice(REDACTED);
                at = hit + needle.bytes.len();
            }
            out.extend_from_slice(rest.get(at..).unwrap_or_default());
        }
    }
}

impl<T: StreamTranslator> StreamTranslator for Scrubbed<T> {
    fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        let from = out.len();
        self.inner.push(chunk, out);
        self.scrub(out, from);
    }

    fn finish(&mut self, out: &mut Vec<u8>) {
        let from = out.len();
        self.inner.finish(out);
        self.scrub(out, from);
    }

    fn usage(&self) -> Option<Usage> {
        self.inner.usage()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Passes its input on as it comes: shows what `Scrubbed` does alone.
    struct Echo;

    impl StreamTranslator for Echo {
        fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
            out.extend_from_slice(chunk);
        }
        fn finish(&mut self, _: &mut Vec<u8>) {}
        fn usage(&self) -> Option<Usage> {
            None
        }
    }

    fn scrubbed(secrets: &[&str], input: &str) -> String {
        let mut t = Scrubbed::new(Echo, secrets);
        let mut out = Vec::new();
        t.push(input.as_bytes(), &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_search_agrees_with_a_naive_one() {
        let naive = |hay: &[u8], needle: &[u8], from: usize| {
            (from..=hay.len().saturating_sub(needle.len()))
                .find(|&i| hay.get(i..i + needle.len()) == Some(needle))
        };
        let hay = b"abababcabcabcdabcdeaaaaab sk-1 sk-12 sk-123 sk-1234 /x/ \\/x\\/ abc";
        for needle in [
            &b"a"[..],
            b"ab",
            b"abc",
            b"abcd",
            b"aab",
            b"sk-123",
            b"\\/x",
            b"zz",
            b"abc ",
            hay,
        ] {
            let n = Needle::new(needle.to_vec()).unwrap();
            for from in 0..=hay.len() {
                assert_eq!(
                    n.find(hay, from),
                    naive(hay, needle, from),
                    "{needle:?} {from}"
                );
            }
        }
        assert!(Needle::new(Vec::new()).is_none());
    }

    #[test]
    fn every_key_is_redacted_and_nothing_else_changes() {
        let secrets = ["sk-live-123", "aws/secret+key", ""];
        let cases = [
            ("no key here", "no key here"),
            (
                r#"data: {"error":{"message":"bad key sk-live-123 (sk-live-123)"}}"#,
                r#"data: {"error":{"message":"bad key [redacted] ([redacted])"}}"#,
            ),
            ("sk-live-12 is not it", "sk-live-12 is not it"),
            ("aws/secret+key", "[redacted]"),
            (r#""aws\/secret+key""#, r#""[redacted]""#),
            ("sk-live-123aws/secret+key", "[redacted][redacted]"),
        ];
        for (input, want) in cases {
            assert_eq!(scrubbed(&secrets, input), want, "{input}");
        }
        // A key containing another goes whole.
        assert_eq!(
            scrubbed(&["sk", "sk-long"], "sk-long sk"),
            "[redacted] [redacted]"
        );
    }

    #[test]
    fn output_already_written_is_left_alone() {
        let mut t = Scrubbed::new(Echo, &["key"]);
        let mut out = b"key before".to_vec();
        t.push(b" key", &mut out);
        assert_eq!(out, b"key before [redacted]");
    }
}
