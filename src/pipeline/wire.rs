//! A small length-prefixed binary encoding for values one half of the
//! filter hands the other through Envoy's filter state.
//!
//! serde_json cost thousands of instructions per request to write and read
//! the routing plan; this writes integers as LEB128 varints and strings as a
//! length and their bytes. The reader trusts nothing: a value that runs
//! short, has an overlong or oversized varint, invalid UTF-8, or bytes left
//! over reads as None, so a garbled value is refused rather than misread.

/// Appends values to a buffer.
#[derive(Debug, Default)]
pub struct Writer(Vec<u8>);

impl Writer {
    pub fn new() -> Self {
        Writer(Vec::with_capacity(128))
    }

    pub fn u64(&mut self, mut n: u64) {
        while n >= 0x80 {
            self.0.push((n & 0x7f) as u8 | 0x80);
            n >>= 7;
        }
        self.0.push(n as u8);
    }

    pub fn usize(&mut self, n: usize) {
        self.u64(n as u64);
    }

    pub fn bool(&mut self, b: bool) {
        self.0.push(u8::from(b));
    }

    pub fn str(&mut self, s: &str) {
        self.usize(s.len());
        self.0.extend_from_slice(s.as_bytes());
    }

    pub fn finish(self) -> Vec<u8> {
        self.0
    }
}

/// Reads values back in the order they were written.
#[derive(Debug)]
pub struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader(bytes)
    }

    pub fn u64(&mut self) -> Option<u64> {
        let mut n: u64 = 0;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = self.0.split_first()?;
            self.0 = rest;
            let bits = u64::from(byte & 0x7f);
            // The tenth byte may only carry the top bit of a u64.
            if shift == 63 && bits > 1 {
                return None;
            }
            n |= bits << shift;
            if byte & 0x80 == 0 {
                // A trailing zero byte would be a second spelling of n.
                return (byte != 0 || shift == 0).then_some(n);
            }
        }
        None
    }

    pub fn usize(&mut self) -> Option<usize> {
        usize::try_from(self.u64()?).ok()
    }

    pub fn bool(&mut self) -> Option<bool> {
        match self.byte()? {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }
    }

    pub fn byte(&mut self) -> Option<u8> {
        let (&byte, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(byte)
    }

    pub fn str(&mut self) -> Option<&'a str> {
        let len = self.usize()?;
        if len > self.0.len() {
            return None;
        }
        let (bytes, rest) = self.0.split_at(len);
        self.0 = rest;
        std::str::from_utf8(bytes).ok()
    }

    /// A count of items that follow, each at least one byte long: larger
    /// than what is left is refused, so a garbled count cannot make the
    /// caller reserve memory for it.
    pub fn count(&mut self) -> Option<usize> {
        self.usize().filter(|&n| n <= self.0.len())
    }

    /// True when everything was read.
    pub fn is_done(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip() {
        let numbers = [
            0,
            1,
            127,
            128,
            300,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ];
        let strings = ["", "a", "shop/checkout", "naïve ✓", &"x".repeat(300)];
        let mut w = Writer::new();
        for n in numbers {
            w.u64(n);
        }
        for s in strings {
            w.str(s);
        }
        w.bool(true);
        w.bool(false);
        w.usize(2);
        w.usize(7);
        w.usize(9);
        let bytes = w.finish();
        let mut r = Reader::new(&bytes);
        for n in numbers {
            assert_eq!(r.u64(), Some(n));
        }
        for s in strings {
            assert_eq!(r.str(), Some(s));
        }
        assert_eq!(r.bool(), Some(true));
        assert_eq!(r.bool(), Some(false));
        assert_eq!(r.count(), Some(2));
        assert_eq!(r.usize(), Some(7));
        assert!(!r.is_done());
        assert_eq!(r.usize(), Some(9));
        assert!(r.is_done());
        assert_eq!(r.byte(), None, "nothing past the end");
    }

    #[test]
    fn varints_are_small_and_canonical() {
        let encoded = |n: u64| {
            let mut w = Writer::new();
            w.u64(n);
            w.finish()
        };
        assert_eq!(encoded(0), [0]);
        assert_eq!(encoded(127), [0x7f]);
        assert_eq!(encoded(128), [0x80, 0x01]);
        assert_eq!(encoded(u64::MAX).len(), 10);
    }

    #[test]
    fn malformed_input_reads_as_none() {
        type Read = fn(&mut Reader) -> bool;
        let cases: &[(&[u8], Read, &str)] = &[
            (&[], |r| r.u64().is_none(), "empty"),
            (&[0x80], |r| r.u64().is_none(), "varint cut short"),
            (&[0x80, 0x00], |r| r.u64().is_none(), "overlong zero"),
            (&[0xff, 0x00], |r| r.u64().is_none(), "overlong 127"),
            (
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02],
                |r| r.u64().is_none(),
                "past u64",
            ),
            (
                &[
                    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x81, 0x00,
                ],
                |r| r.u64().is_none(),
                "eleven bytes",
            ),
            (&[2], |r| r.bool().is_none(), "bool other than 0 or 1"),
            (&[3, b'a', b'b'], |r| r.str().is_none(), "string cut short"),
            (&[2, 0xc3, 0x28], |r| r.str().is_none(), "invalid UTF-8"),
            (
                &[0xff, 0xff, 0xff, 0xff, 0x0f, b'a'],
                |r| r.str().is_none(),
                "huge length",
            ),
            (&[5, 1, 2], |r| r.count().is_none(), "count past the end"),
        ];
        for (bytes, read, why) in cases {
            assert!(read(&mut Reader::new(bytes)), "{why}");
        }
    }
}
