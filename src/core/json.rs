//! A validating scanner for the top level of a JSON object.
//!
//! The gateway only needs a handful of top-level fields of a request (`model`,
//! `stream`, ...) and must leave everything else byte-for-byte intact. Parsing
//! into `serde_json::Value` and serializing again costs more than the rest of
//! the filter together, so this scanner validates the whole document in one
//! pass and records where each top-level value starts and ends. Callers read
//! the few values they need and splice replacements into the original bytes.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

/// Nesting deeper than this is refused rather than risking the VM's stack.
const MAX_DEPTH: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonError {
    pub offset: usize,
    pub reason: &'static str,
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at byte {}", self.reason, self.offset)
    }
}

/// The JSON kind of a value, as far as callers need to tell them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Object,
    Array,
    String,
    Number,
    Bool,
    Null,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Object => "an object",
            Kind::Array => "an array",
            Kind::String => "a string",
            Kind::Number => "a number",
            Kind::Bool => "a boolean",
            Kind::Null => "null",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Field {
    /// Key bytes between the quotes, still escaped.
    pub key: Range<usize>,
    pub key_has_escapes: bool,
    /// The value's bytes, from its first to its last character.
    pub value: Range<usize>,
    pub kind: Kind,
}

/// The top-level fields of a JSON object, borrowed from the document.
#[derive(Debug)]
pub struct TopLevel<'a> {
    doc: &'a [u8],
    fields: Vec<Field>,
}

impl<'a> TopLevel<'a> {
    /// Validates `doc` as one JSON object (surrounding whitespace allowed).
    pub fn parse(doc: &'a [u8]) -> Result<Self, JsonError> {
        if let Err(e) = std::str::from_utf8(doc) {
            return Err(JsonError {
                offset: e.valid_up_to(),
                reason: "invalid UTF-8",
            });
        }
        let mut s = Scanner { doc, pos: 0 };
        s.skip_ws();
        if s.peek() != Some(b'{') {
            return Err(s.err("expected a JSON object"));
        }
        let fields = s.top_object()?;
        s.skip_ws();
        if s.pos != doc.len() {
            return Err(s.err("trailing characters after the JSON object"));
        }
        Ok(TopLevel { doc, fields })
    }

    pub fn fields(&self) -> &[Field] {
        &self.fields
    }

    fn key_is(&self, field: &Field, name: &str) -> bool {
        if field.key_has_escapes {
            decode_string(self.doc, field.key.start - 1..field.key.end + 1).as_deref() == Some(name)
        } else {
            &self.doc[field.key.clone()] == name.as_bytes()
        }
    }

    /// The field called `name`; a key given twice is an error, because
    /// providers disagree on which copy wins and the gateway must route on the
    /// same value the provider will use.
    pub fn get(&self, name: &str) -> Result<Option<&Field>, DuplicateKey> {
        let mut found = None;
        for field in self.fields.iter().filter(|f| self.key_is(f, name)) {
            if found.is_some() {
                return Err(DuplicateKey);
            }
            found = Some(field);
        }
        Ok(found)
    }

    /// The last field called `name`: where keys repeat, the copy
    /// `serde_json::Value` would keep.
    pub fn last(&self, name: &str) -> Option<&Field> {
        self.fields.iter().rev().find(|f| self.key_is(f, name))
    }

    /// The value of `field` when it is a whole number that fits a `u64`
    /// (what `serde_json::Value::as_u64` accepts: no sign, fraction or
    /// exponent).
    pub fn u64_value(&self, field: &Field) -> Option<u64> {
        let raw = self.raw(field);
        if field.kind != Kind::Number || !raw.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(raw).ok()?.parse().ok()
    }

    pub fn raw(&self, field: &Field) -> &'a [u8] {
        &self.doc[field.value.clone()]
    }

    /// The decoded string value of `field`, or None when it is not a string.
    pub fn str_value(&self, field: &Field) -> Option<Cow<'a, str>> {
        if field.kind != Kind::String {
            return None;
        }
        decode_string(self.doc, field.value.clone())
    }

    pub fn bool_value(&self, field: &Field) -> Option<bool> {
        match self.raw(field) {
            b"true" => Some(true),
            b"false" => Some(false),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DuplicateKey;

/// Decodes the JSON string literal at `span` (quotes included).
fn decode_string(doc: &[u8], span: Range<usize>) -> Option<Cow<'_, str>> {
    let lit = doc.get(span)?;
    let inner = lit.get(1..lit.len().checked_sub(1)?)?;
    if !inner.contains(&b'\\') {
        return std::str::from_utf8(inner).ok().map(Cow::Borrowed);
    }
    from_slice_lossy::<String>(lit).ok().map(Cow::Owned)
}

/// `serde_json::from_slice`, except that a `\u` escape of a lone UTF-16
/// surrogate reads as U+FFFD. RFC 8259's grammar allows such escapes and
/// providers do send them (a model's output cut between the two halves of
/// a pair); serde_json refuses the whole document. Documents without one
/// cost nothing extra: they are only looked at again when parsing failed.
pub fn from_slice_lossy<T: serde::de::DeserializeOwned>(text: &[u8]) -> serde_json::Result<T> {
    serde_json::from_slice(text).or_else(|e| match replace_lone_surrogates(text) {
        Some(fixed) => serde_json::from_slice(&fixed),
        None => Err(e),
    })
}

/// [`from_slice_lossy`] for text.
pub fn from_str_lossy<T: serde::de::DeserializeOwned>(text: &str) -> serde_json::Result<T> {
    from_slice_lossy(text.as_bytes())
}

/// The four hex digits at `at`, as a UTF-16 code unit.
fn hex4(text: &[u8], at: usize) -> Option<u16> {
    let digits = std::str::from_utf8(text.get(at..at.checked_add(4)?)?).ok()?;
    if !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u16::from_str_radix(digits, 16).ok()
}

/// `text` with every `\u` escape of an unpaired surrogate replaced by
/// `\ufffd`; None when there is none. Backslashes only occur inside JSON
/// strings, so stepping from one escape to the next reads them as a JSON
/// parser does.
fn replace_lone_surrogates(text: &[u8]) -> Option<Vec<u8>> {
    const HIGH: std::ops::Range<u16> = 0xD800..0xDC00;
    const LOW: std::ops::Range<u16> = 0xDC00..0xE000;
    let mut out: Option<Vec<u8>> = None;
    let mut copied = 0;
    let mut at = 0;
    while let Some(found) = text.get(at..)?.iter().position(|&b| b == b'\\') {
        let escape = at + found;
        if text.get(escape + 1) != Some(&b'u') {
            at = escape + 2;
            continue;
        }
        at = escape + 6;
        let Some(unit) = hex4(text, escape + 2) else {
            continue;
        };
        if HIGH.contains(&unit) {
            let paired = text.get(escape + 6..escape + 8) == Some(&b"\\u"[..])
                && hex4(text, escape + 8).is_some_and(|next| LOW.contains(&next));
            if paired {
                at = escape + 12;
                continue;
            }
        } else if !LOW.contains(&unit) {
            continue;
        }
        let fixed = out.get_or_insert_with(|| Vec::with_capacity(text.len()));
        fixed.extend_from_slice(text.get(copied..escape)?);
        fixed.extend_from_slice(b"\\ufffd");
        copied = at;
    }
    let mut fixed = out?;
    fixed.extend_from_slice(text.get(copied..)?);
    Some(fixed)
}

/// Returns `doc` with several non-overlapping spans replaced at once (in any
/// order), copying the untouched bytes only once.
pub fn splice_all(doc: &[u8], mut edits: Vec<(Range<usize>, Vec<u8>)>) -> Vec<u8> {
    edits.sort_by_key(|(span, _)| (span.start, span.end));
    let added: usize = edits.iter().map(|(_, b)| b.len()).sum();
    let mut out = Vec::with_capacity(doc.len() + added);
    let mut at = 0;
    for (span, bytes) in &edits {
        out.extend_from_slice(doc.get(at..span.start).unwrap_or_default());
        out.extend_from_slice(bytes);
        at = at.max(span.end);
    }
    out.extend_from_slice(doc.get(at..).unwrap_or_default());
    out
}

/// Returns `doc` with the bytes in `span` replaced by `replacement`.
pub fn splice(doc: &[u8], span: Range<usize>, replacement: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(doc.len() + replacement.len());
    out.extend_from_slice(&doc[..span.start]);
    out.extend_from_slice(replacement);
    out.extend_from_slice(&doc[span.end..]);
    out
}

/// Encodes `s` as a JSON string literal.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

struct Scanner<'a> {
    doc: &'a [u8],
    pos: usize,
}

/// The first byte of `bytes` that ends a string's plain run: a quote, a
/// backslash or a control character. Eight bytes at a time: string bodies
/// are most of a large request, and a byte-wise search costs several times
/// as many instructions.
fn string_stop(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let mut chunks = bytes.chunks_exact(8);
    let mut offset = 0;
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let w = u64::from_le_bytes(word);
        // A byte's high bit marks a zero byte (after the XOR) or one below
        // 0x20; carries can only mark bytes above a true hit, so the lowest
        // mark is exact.
        let zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS;
        let hits = zero(w ^ (ONES * u64::from(b'"')))
            | zero(w ^ (ONES * u64::from(b'\\')))
            | (w.wrapping_sub(ONES * 0x20) & !w & HIGHS);
        if hits != 0 {
            return Some(offset + (hits.trailing_zeros() / 8) as usize);
        }
        offset += 8;
    }
    chunks
        .remainder()
        .iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
        .map(|i| offset + i)
}

impl Scanner<'_> {
    fn err(&self, reason: &'static str) -> JsonError {
        JsonError {
            offset: self.pos,
            reason,
        }
    }

    fn peek(&self) -> Option<u8> {
        self.doc.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    fn expect(&mut self, byte: u8, reason: &'static str) -> Result<(), JsonError> {
        if self.peek() == Some(byte) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.err(reason))
        }
    }

    fn top_object(&mut self) -> Result<Vec<Field>, JsonError> {
        let mut fields = Vec::with_capacity(8);
        self.pos += 1; // '{'
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(fields);
        }
        loop {
            self.skip_ws();
            if self.peek() != Some(b'"') {
                return Err(self.err("expected a string key"));
            }
            let key_start = self.pos;
            let key_has_escapes = self.string()?;
            let key = key_start + 1..self.pos - 1;
            self.skip_ws();
            self.expect(b':', "expected ':' after a key")?;
            self.skip_ws();
            let value_start = self.pos;
            let kind = self.value(1)?;
            fields.push(Field {
                key,
                key_has_escapes,
                value: value_start..self.pos,
                kind,
            });
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(fields);
                }
                _ => return Err(self.err("expected ',' or '}' in an object")),
            }
        }
    }

    fn value(&mut self, depth: usize) -> Result<Kind, JsonError> {
        if depth > MAX_DEPTH {
            return Err(self.err("nesting too deep"));
        }
        match self.peek() {
            Some(b'{') => {
                self.container(b'}', depth, true)?;
                Ok(Kind::Object)
            }
            Some(b'[') => {
                self.container(b']', depth, false)?;
                Ok(Kind::Array)
            }
            Some(b'"') => {
                self.string()?;
                Ok(Kind::String)
            }
            Some(b't') => self.literal(b"true", Kind::Bool),
            Some(b'f') => self.literal(b"false", Kind::Bool),
            Some(b'n') => self.literal(b"null", Kind::Null),
            Some(b'-' | b'0'..=b'9') => {
                self.number()?;
                Ok(Kind::Number)
            }
            None => Err(self.err("unexpected end of input")),
            _ => Err(self.err("expected a JSON value")),
        }
    }

    fn container(&mut self, close: u8, depth: usize, keyed: bool) -> Result<(), JsonError> {
        self.pos += 1;
        self.skip_ws();
        if self.peek() == Some(close) {
            self.pos += 1;
            return Ok(());
        }
        loop {
            self.skip_ws();
            if keyed {
                if self.peek() != Some(b'"') {
                    return Err(self.err("expected a string key"));
                }
                self.string()?;
                self.skip_ws();
                self.expect(b':', "expected ':' after a key")?;
                self.skip_ws();
            }
            self.value(depth + 1)?;
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(c) if c == close => {
                    self.pos += 1;
                    return Ok(());
                }
                _ if keyed => return Err(self.err("expected ',' or '}' in an object")),
                _ => return Err(self.err("expected ',' or ']' in an array")),
            }
        }
    }

    /// Scans a string literal; returns whether it contains escapes.
    fn string(&mut self) -> Result<bool, JsonError> {
        self.pos += 1; // opening quote
        let mut escaped = false;
        loop {
            // Fast path: run to the next byte that needs attention.
            let rest = &self.doc[self.pos..];
            let skip = string_stop(rest).ok_or(JsonError {
                offset: self.doc.len(),
                reason: "unterminated string",
            })?;
            self.pos += skip;
            match self.doc[self.pos] {
                b'"' => {
                    self.pos += 1;
                    return Ok(escaped);
                }
                b'\\' => {
                    escaped = true;
                    self.pos += 1;
                    match self.peek() {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {
                            self.pos += 1
                        }
                        Some(b'u') => {
                            let hex = self.doc.get(self.pos + 1..self.pos + 5);
                            match hex {
                                Some(h) if h.iter().all(u8::is_ascii_hexdigit) => self.pos += 5,
                                _ => return Err(self.err("invalid \\u escape")),
                            }
                        }
                        _ => return Err(self.err("invalid escape in string")),
                    }
                }
                _ => return Err(self.err("control character in string")),
            }
        }
    }

    fn literal(&mut self, word: &'static [u8], kind: Kind) -> Result<Kind, JsonError> {
        if self.doc[self.pos..].starts_with(word) {
            self.pos += word.len();
            Ok(kind)
        } else {
            Err(self.err("expected a JSON value"))
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.pos;
        while let Some(b'0'..=b'9') = self.peek() {
            self.pos += 1;
        }
        self.pos - start
    }

    fn number(&mut self) -> Result<(), JsonError> {
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(self.err("invalid number")),
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if self.digits() == 0 {
                return Err(self.err("invalid number"));
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.pos += 1;
            }
            if self.digits() == 0 {
                return Err(self.err("invalid number"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn top(doc: &str) -> TopLevel<'_> {
        TopLevel::parse(doc.as_bytes()).unwrap()
    }

    #[test]
    fn string_stop_finds_the_first_special_byte_like_a_bytewise_search() {
        let naive = |b: &[u8]| b.iter().position(|&c| c == b'"' || c == b'\\' || c < 0x20);
        // Every byte value at every offset of short and word-spanning runs,
        // over fillers that include UTF-8 bytes and bytes next to the
        // special ones (0x1f, 0x21, 0x5b, 0x5d, 0xa2, 0xdc).
        for filler in [b'a', 0x21, 0x5d, 0x5b, 0xa2, 0xdc, 0xff, 0x80, 0x7f] {
            for len in 0..20 {
                for at in 0..len {
                    for byte in 0..=255u8 {
                        let mut buf = vec![filler; len];
                        buf[at] = byte;
                        assert_eq!(string_stop(&buf), naive(&buf), "{buf:?}");
                        // A later special byte must not hide an earlier one.
                        if at + 1 < len {
                            buf[len - 1] = b'"';
                            assert_eq!(string_stop(&buf), naive(&buf), "{buf:?}");
                        }
                    }
                }
            }
        }
        let text = "h\\u00e9llo wörld \\\"quoted\\\" 日本語\\n\n".repeat(40);
        for start in 0..text.len() {
            let tail = &text.as_bytes()[start..];
            assert_eq!(string_stop(tail), naive(tail));
        }
    }

    #[test]
    fn finds_top_level_fields_and_ignores_nested_ones() {
        let doc = r#" {"messages":[{"role":"user","content":"model"}],"model":"gpt-4o","stream":true,"x":{"model":"inner"}} "#;
        let t = top(doc);
        let model = t.get("model").unwrap().unwrap();
        assert_eq!(t.str_value(model).unwrap(), "gpt-4o");
        assert_eq!(&doc[model.value.clone()], "\"gpt-4o\"");
        let stream = t.get("stream").unwrap().unwrap();
        assert_eq!(t.bool_value(stream), Some(true));
        assert_eq!(t.get("messages").unwrap().unwrap().kind, Kind::Array);
        assert_eq!(t.fields().len(), 4);
        assert!(t.get("absent").unwrap().is_none());
    }

    #[test]
    fn decodes_escaped_keys_and_values() {
        let t = top(r#"{"mod\u0065l":"gpt\u002d4o\n"}"#);
        let f = t.get("model").unwrap().unwrap();
        assert_eq!(t.str_value(f).unwrap(), "gpt-4o\n");
    }

    #[test]
    fn duplicate_keys_are_reported() {
        let t = top(r#"{"model":"a","model":"b"}"#);
        assert_eq!(t.get("model").unwrap_err(), DuplicateKey);
        let t = top(r#"{"model":"a","mod\u0065l":"b"}"#);
        assert_eq!(t.get("model").unwrap_err(), DuplicateKey);
    }

    #[test]
    fn splice_replaces_only_the_value() {
        let doc = r#"{"model": "a",  "n" :1}"#;
        let t = top(doc);
        let f = t.get("model").unwrap().unwrap();
        let out = splice(doc.as_bytes(), f.value.clone(), quote("b\"c").as_bytes());
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"model": "b\"c",  "n" :1}"#
        );
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["model"], "b\"c");
    }

    #[test]
    fn kinds_are_reported() {
        let t = top(r#"{"a":{},"b":[],"c":"","d":-1.5e3,"e":false,"f":null}"#);
        let kinds: Vec<Kind> = t.fields().iter().map(|f| f.kind).collect();
        assert_eq!(
            kinds,
            vec![
                Kind::Object,
                Kind::Array,
                Kind::String,
                Kind::Number,
                Kind::Bool,
                Kind::Null
            ]
        );
    }

    #[test]
    fn rejects_invalid_documents() {
        let bad = [
            "",
            "[]",
            "\"x\"",
            "{",
            "{\"a\"}",
            "{\"a\":}",
            "{\"a\":1,}",
            "{\"a\":1}x",
            "{\"a\":01}",
            "{\"a\":1.}",
            "{\"a\":-}",
            "{\"a\":tru}",
            "{\"a\":\"\\x\"}",
            "{\"a\":\"\\u12g4\"}",
            "{\"a\":\"line\nbreak\"}",
            "{\"a\":[1 2]}",
            "{\"a\":{\"b\" 1}}",
            "{\"a\":\"unterminated}",
            "{'a':1}",
        ];
        for doc in bad {
            assert!(TopLevel::parse(doc.as_bytes()).is_err(), "accepted {doc:?}");
            assert!(
                serde_json::from_str::<serde_json::Value>(doc)
                    .map(|v| !v.is_object())
                    .unwrap_or(true),
                "serde_json disagrees on {doc:?}"
            );
        }
    }

    #[test]
    fn rejects_invalid_utf8_and_deep_nesting() {
        assert!(TopLevel::parse(b"{\"a\":\"\xff\"}").is_err());
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(200), "]".repeat(200));
        let err = TopLevel::parse(deep.as_bytes()).unwrap_err();
        assert_eq!(err.reason, "nesting too deep");
    }

    #[test]
    fn agrees_with_serde_json_on_valid_documents() {
        let docs = [
            r#"{}"#,
            r#"{"a":[1,2,{"b":[true,false,null]}],"c":"\u00e9\"\\/","d":-0.0e+1}"#,
            "\t{ \"a\" : [ ] , \"b\" : { } }\r\n",
            r#"{"emoji":"😀","n":12345678901234567890}"#,
        ];
        for doc in docs {
            let t = TopLevel::parse(doc.as_bytes()).unwrap();
            let v: serde_json::Value = serde_json::from_str(doc).unwrap();
            assert_eq!(t.fields().len(), v.as_object().unwrap().len());
        }
    }

    #[test]
    fn lone_surrogate_escapes_read_as_replacement_characters() {
        let read = |doc: &str| from_str_lossy::<serde_json::Value>(doc).unwrap()["t"].clone();
        // (document, decoded, whether serde_json alone refuses it)
        let table = [
            (r#"{"t":"\ud800x"}"#, "\u{fffd}x", true),
            (r#"{"t":"a\udfff"}"#, "a\u{fffd}", true),
            (r#"{"t":"\ud83d\ude00"}"#, "😀", false),
            (
                r#"{"t":"\ud800\ud83d\ude00\udc00"}"#,
                "\u{fffd}😀\u{fffd}",
                true,
            ),
            (r#"{"t":"\\ud800"}"#, "\\ud800", false),
            (r#"{"t":"\\\ud800"}"#, "\\\u{fffd}", true),
            (r#"{"t":"\uD800\u0041"}"#, "\u{fffd}A", true),
            (r#"{"t":"\"\ud800"}"#, "\"\u{fffd}", true),
        ];
        for (doc, want, refused) in table {
            let strict = serde_json::from_str::<serde_json::Value>(doc);
            assert_eq!(strict.is_err(), refused, "{doc}");
            assert_eq!(read(doc), want, "{doc}");
        }
        // The scanner accepts them as JSON text; their values decode.
        let t = top(r#"{"t":"\udc00!"}"#);
        assert_eq!(
            t.str_value(t.get("t").unwrap().unwrap()).unwrap(),
            "\u{fffd}!"
        );
        // Documents that are wrong for other reasons stay wrong.
        assert!(from_str_lossy::<serde_json::Value>(r#"{"t":"\ud800"#).is_err());
        assert!(from_str_lossy::<serde_json::Value>(r#"{"t":"\ud80"}"#).is_err());
        assert_eq!(replace_lone_surrogates(br#"{"t":"\ud83d\ude00"}"#), None);
    }

    #[test]
    fn splice_all_applies_edits_in_any_order() {
        let doc = br#"{"model":"a","x":1}"#;
        let out = splice_all(
            doc,
            vec![(18..18, b",\"y\":2".to_vec()), (9..12, b"\"bb\"".to_vec())],
        );
        assert_eq!(out, br#"{"model":"bb","x":1,"y":2}"#);
        assert_eq!(splice_all(doc, Vec::new()), doc);
    }
}
