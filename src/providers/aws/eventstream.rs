//! The AWS event-stream binary framing (`application/vnd.amazon.eventstream`),
//! as Bedrock's streaming APIs send it.
//!
//! One message:
//!
//! ```text
//! total length  u32 BE   (the whole message, these 4 bytes and the CRCs included)
//! headers length u32 BE
//! prelude CRC   u32 BE   (CRC-32 of the 8 bytes above)
//! headers       name length u8, name, value type u8, value
//! payload       total - headers - 16 bytes
//! message CRC   u32 BE   (CRC-32 of everything before it)
//! ```
//!
//! The CRC is the common CRC-32 (IEEE 802.3, reflected, polynomial
//! 0xEDB88320): the one zlib, PNG and Python's `zlib.crc32` compute.

/// The smallest message: prelude, its CRC and the message CRC.
const MIN_MESSAGE_BYTES: usize = 16;
/// The largest message accepted: AWS caps payloads at 16 MiB and headers at
/// 128 KiB; anything longer is a corrupt length, not a message.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024 + 128 * 1024 + MIN_MESSAGE_BYTES;

const fn crc_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

static CRC_TABLE: [u32; 256] = crc_table();

/// Continues a CRC-32 over `data` (start with 0).
pub fn crc32_update(crc: u32, data: &[u8]) -> u32 {
    let mut c = !crc;
    for &b in data {
        c = CRC_TABLE[usize::from((c as u8) ^ b)] ^ (c >> 8);
    }
    !c
}

/// CRC-32 of `data`.
pub fn crc32(data: &[u8]) -> u32 {
    crc32_update(0, data)
}

/// A header value, by its wire type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderValue {
    Bool(bool),
    Byte(i8),
    Short(i16),
    Int(i32),
    Long(i64),
    Bytes(Vec<u8>),
    String(String),
    /// Milliseconds since the Unix epoch.
    Timestamp(i64),
    Uuid([u8; 16]),
}

/// One decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub headers: Vec<(String, HeaderValue)>,
    pub payload: Vec<u8>,
}

impl Message {
    /// The value of a string header such as `:event-type`.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.headers.iter().find_map(|(n, v)| match v {
            HeaderValue::String(s) if n == name => Some(s.as_str()),
            _ => None,
        })
    }
}

/// Reads big-endian integers and slices off a byte slice, without panicking.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if n > self.rest.len() {
            return Err("a header runs past the end of the headers".into());
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
}

fn parse_headers(bytes: &[u8]) -> Result<Vec<(String, HeaderValue)>, String> {
    let mut r = Reader { rest: bytes };
    let mut headers = Vec::new();
    while !r.rest.is_empty() {
        let [name_len] = r.array::<1>()?;
        let name = std::str::from_utf8(r.take(usize::from(name_len))?)
            .map_err(|_| "a header name is not UTF-8".to_string())?
            .to_string();
        let [kind] = r.array::<1>()?;
        let value = match kind {
            0 => HeaderValue::Bool(true),
            1 => HeaderValue::Bool(false),
            2 => HeaderValue::Byte(i8::from_be_bytes(r.array()?)),
            3 => HeaderValue::Short(i16::from_be_bytes(r.array()?)),
            4 => HeaderValue::Int(i32::from_be_bytes(r.array()?)),
            5 => HeaderValue::Long(i64::from_be_bytes(r.array()?)),
            6 | 7 => {
                let len = usize::from(u16::from_be_bytes(r.array()?));
                let data = r.take(len)?;
                if kind == 6 {
                    HeaderValue::Bytes(data.to_vec())
                } else {
                    HeaderValue::String(
                        std::str::from_utf8(data)
                            .map_err(|_| format!("the header {name:?} is not UTF-8"))?
                            .to_string(),
                    )
                }
            }
            8 => HeaderValue::Timestamp(i64::from_be_bytes(r.array()?)),
            9 => HeaderValue::Uuid(r.array()?),
            other => return Err(format!("the header {name:?} has unknown type {other}")),
        };
        headers.push((name, value));
    }
    Ok(headers)
}

fn be_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at + 4)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Incremental decoder: bytes cut anywhere in, whole messages out.
///
/// After an error the stream cannot be resynchronised: every later `push`
/// returns the same error.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    error: Option<String>,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes; returns every message they complete, in order. On a
    /// framing error (bad CRC, impossible length, malformed header) the
    /// messages completed before it in these bytes are dropped with it; use
    /// [`Decoder::push_into`] to keep them.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<Message>, String> {
        let mut messages = Vec::new();
        self.push_into(bytes, &mut messages)?;
        Ok(messages)
    }

    /// Feeds bytes; appends to `out` every message they complete, in order,
    /// up to a framing error if there is one (then returned).
    pub fn push_into(&mut self, bytes: &[u8], out: &mut Vec<Message>) -> Result<(), String> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        self.buf.extend_from_slice(bytes);
        let mut at = 0;
        let result = loop {
            match self.next_message(at) {
                Ok(Some((message, len))) => {
                    out.push(message);
                    at += len;
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        self.buf.drain(..at.min(self.buf.len()));
        if let Err(e) = &result {
            self.error = Some(e.clone());
            self.buf = Vec::new();
        }
        result
    }

    /// Bytes held of a message not complete yet.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The message starting at `at`, with its length, once it is complete.
    fn next_message(&self, at: usize) -> Result<Option<(Message, usize)>, String> {
        let bytes = self.buf.get(at..).unwrap_or_default();
        let (Some(total), Some(headers_len), Some(prelude_crc)) =
            (be_u32(bytes, 0), be_u32(bytes, 4), be_u32(bytes, 8))
        else {
            return Ok(None);
        };
        let prelude = bytes.get(..8).unwrap_or_default();
        if crc32(prelude) != prelude_crc {
            return Err("event-stream prelude CRC mismatch".into());
        }
        let total = total as usize;
        let headers_len = headers_len as usize;
        if !(MIN_MESSAGE_BYTES..=MAX_MESSAGE_BYTES).contains(&total)
            || headers_len > total - MIN_MESSAGE_BYTES
        {
            return Err(format!(
                "event-stream message length {total} (headers {headers_len}) is impossible"
            ));
        }
        let Some(frame) = bytes.get(..total) else {
            return Ok(None);
        };
        let (body, crc) = frame.split_at(total - 4);
        if be_u32(crc, 0) != Some(crc32(body)) {
            return Err("event-stream message CRC mismatch".into());
        }
        let headers = parse_headers(body.get(12..12 + headers_len).unwrap_or_default())?;
        let payload = body.get(12 + headers_len..).unwrap_or_default().to_vec();
        Ok(Some((Message { headers, payload }, total)))
    }
}

/// Encodes one message with string headers (what Bedrock sends). For tests
/// and mocks; a header name over 255 bytes or a value over 65535 is cut.
pub fn encode(headers: &[(&str, &str)], payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::new();
    for (name, value) in headers {
        let name = name
            .as_bytes()
            .get(..name.len().min(255))
            .unwrap_or_default();
        let value = value
            .as_bytes()
            .get(..value.len().min(65535))
            .unwrap_or_default();
        h.push(name.len() as u8);
        h.extend_from_slice(name);
        h.push(7);
        h.extend_from_slice(&(value.len() as u16).to_be_bytes());
        h.extend_from_slice(value);
    }
    let total = (MIN_MESSAGE_BYTES + h.len() + payload.len()) as u32;
    let mut out = Vec::with_capacity(total as usize);
    out.extend_from_slice(&total.to_be_bytes());
    out.extend_from_slice(&(h.len() as u32).to_be_bytes());
    let prelude_crc = crc32(&out);
    out.extend_from_slice(&prelude_crc.to_be_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(payload);
    let crc = crc32(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn crc32_check_values() {
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(
            crc32(b"The quick brown fox jumps over the lazy dog"),
            0x414F_A339
        );
        assert_eq!(crc32_update(crc32(b"12345"), b"6789"), 0xCBF4_3926);
    }

    /// The event-stream test suite's "empty message" and "payload only"
    /// frames; the bytes were computed independently with Python's
    /// `zlib.crc32` and `struct.pack`.
    #[test]
    fn decodes_known_frames() {
        // Empty message: 16 bytes, no headers, no payload.
        let empty = unhex("00000010 00000000 05c248eb 7d98c8ff");
        let m = Decoder::new().push(&empty).unwrap();
        assert_eq!(
            m,
            vec![Message {
                headers: vec![],
                payload: vec![]
            }]
        );
        // Payload only: {'foo':'bar'}.
        let payload = unhex("0000001d 00000000 fd528c5a 7b27666f 6f273a27 62617227 7d c3653936");
        let m = Decoder::new().push(&payload).unwrap();
        assert_eq!(m[0].payload, b"{'foo':'bar'}");
        assert!(m[0].headers.is_empty());
    }

    #[test]
    fn all_header_types() {
        let mut h = Vec::new();
        let mut add = |name: &str, kind: u8, value: &[u8]| {
            h.push(name.len() as u8);
            h.extend_from_slice(name.as_bytes());
            h.push(kind);
            h.extend_from_slice(value);
        };
        add("t", 0, &[]);
        add("f", 1, &[]);
        add("b", 2, &[0xff]);
        add("s", 3, &(-2i16).to_be_bytes());
        add("i", 4, &7i32.to_be_bytes());
        add("l", 5, &(-9i64).to_be_bytes());
        add("y", 6, &[0, 2, 0xde, 0xad]);
        add("str", 7, &[0, 3, b'a', b'b', b'c']);
        add("ts", 8, &1_700_000_000_000i64.to_be_bytes());
        add("u", 9, &[7u8; 16]);
        let total = (16 + h.len() + 2) as u32;
        let mut frame = total.to_be_bytes().to_vec();
        frame.extend_from_slice(&(h.len() as u32).to_be_bytes());
        let c = crc32(&frame);
        frame.extend_from_slice(&c.to_be_bytes());
        frame.extend_from_slice(&h);
        frame.extend_from_slice(b"{}");
        let c = crc32(&frame);
        frame.extend_from_slice(&c.to_be_bytes());
        let m = Decoder::new().push(&frame).unwrap().remove(0);
        assert_eq!(
            m.headers,
            vec![
                ("t".to_string(), HeaderValue::Bool(true)),
                ("f".to_string(), HeaderValue::Bool(false)),
                ("b".to_string(), HeaderValue::Byte(-1)),
                ("s".to_string(), HeaderValue::Short(-2)),
                ("i".to_string(), HeaderValue::Int(7)),
                ("l".to_string(), HeaderValue::Long(-9)),
                ("y".to_string(), HeaderValue::Bytes(vec![0xde, 0xad])),
                ("str".to_string(), HeaderValue::String("abc".into())),
                ("ts".to_string(), HeaderValue::Timestamp(1_700_000_000_000)),
                ("u".to_string(), HeaderValue::Uuid([7; 16])),
            ]
        );
        assert_eq!(m.header_str("str"), Some("abc"));
        assert_eq!(m.header_str("i"), None);
        assert_eq!(m.payload, b"{}");
    }

    fn sample() -> (Vec<u8>, Vec<Message>) {
        type Spec<'a> = (&'a [(&'a str, &'a str)], &'a [u8]);
        let specs: [Spec; 3] = [
            (
                &[(":event-type", "messageStart"), (":message-type", "event")],
                br#"{"role":"assistant"}"#,
            ),
            (&[(":event-type", "ping")], b""),
            (
                &[(":content-type", "application/json"), ("x", "caf\u{e9}")],
                "{\"t\":\"☕ ok\"}".as_bytes(),
            ),
        ];
        let mut bytes = Vec::new();
        let mut messages = Vec::new();
        for (headers, payload) in specs {
            bytes.extend(encode(headers, payload));
            messages.push(Message {
                headers: headers
                    .iter()
                    .map(|(n, v)| (n.to_string(), HeaderValue::String(v.to_string())))
                    .collect(),
                payload: payload.to_vec(),
            });
        }
        (bytes, messages)
    }

    #[test]
    fn frames_split_anywhere_or_merged_decode_the_same() {
        let (bytes, want) = sample();
        assert_eq!(Decoder::new().push(&bytes).unwrap(), want);
        let mut d = Decoder::new();
        let mut got = Vec::new();
        for b in &bytes {
            got.extend(d.push(std::slice::from_ref(b)).unwrap());
        }
        assert_eq!(got, want);
        assert_eq!(d.buffered(), 0);
        for at in 0..=bytes.len() {
            for at2 in [at, (at + 7).min(bytes.len()), bytes.len()] {
                let mut d = Decoder::new();
                let mut got = d.push(&bytes[..at]).unwrap();
                got.extend(d.push(&bytes[at..at2]).unwrap());
                got.extend(d.push(&bytes[at2..]).unwrap());
                assert_eq!(got, want, "split at {at}, {at2}");
            }
        }
    }

    #[test]
    fn corruption_is_detected_and_sticky() {
        let (bytes, _) = sample();
        // Flip one bit anywhere: a CRC (or an impossible length) catches it.
        for at in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 0x10;
            let mut d = Decoder::new();
            assert!(d.push(&bad).is_err(), "bit flip at {at} went unnoticed");
            assert!(d.push(&bytes).is_err(), "error is sticky");
        }
    }

    #[test]
    fn push_into_keeps_the_messages_before_a_corrupt_one() {
        let (mut bytes, want) = sample();
        let second_start = encode(
            &[(":event-type", "messageStart"), (":message-type", "event")],
            br#"{"role":"assistant"}"#,
        )
        .len();
        bytes[second_start + 13] ^= 1;
        let mut got = Vec::new();
        assert!(Decoder::new().push_into(&bytes, &mut got).is_err());
        assert_eq!(got, want[..1]);
    }

    #[test]
    fn impossible_lengths_are_rejected_without_waiting() {
        for (total, headers) in [
            (15u32, 0u32),
            (0, 0),
            (u32::MAX, 0),
            ((MAX_MESSAGE_BYTES + 1) as u32, 0),
            (16, 1),
            (100, 85),
        ] {
            let mut prelude = total.to_be_bytes().to_vec();
            prelude.extend_from_slice(&headers.to_be_bytes());
            let c = crc32(&prelude);
            prelude.extend_from_slice(&c.to_be_bytes());
            assert!(Decoder::new().push(&prelude).is_err(), "{total} {headers}");
        }
    }

    #[test]
    fn malformed_headers_are_errors() {
        // A string header whose length runs past the header block.
        let h = [1u8, b'a', 7, 0, 9, b'x'];
        let total = (16 + h.len()) as u32;
        let mut frame = total.to_be_bytes().to_vec();
        frame.extend_from_slice(&(h.len() as u32).to_be_bytes());
        let c = crc32(&frame);
        frame.extend_from_slice(&c.to_be_bytes());
        frame.extend_from_slice(&h);
        let c = crc32(&frame);
        frame.extend_from_slice(&c.to_be_bytes());
        assert!(Decoder::new().push(&frame).is_err());
    }
}
