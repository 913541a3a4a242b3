//! The text a JSON request or answer carries: every string value (never a
//! key), found on the raw bytes in one pass, decoded only when it holds an
//! escape, and rewritten in place when a guardrail redacts it. Whatever the
//! API (OpenAI, Anthropic, Gemini, Responses), prompts, tool results and
//! answers are string values, so one walk covers them all.

use std::ops::Range;

/// Strings this long without a space are data (base64 images, audio), not
/// text: they are not screened.
const DATA_BLOB_BYTES: usize = 1024;

/// One string value: where its content (between the quotes) lies, and the
/// text it decodes to.
pub struct TextValue {
    pub span: Range<usize>,
    pub text: String,
}

/// Every string value of `body` that holds text, in order. Keys, and data
/// blobs (`data:` URLs, long runs without whitespace), are skipped. A body
/// that is not well-formed JSON yields what was read up to the fault.
pub fn text_values(body: &[u8]) -> Vec<TextValue> {
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(&b) = body.get(i) {
        if b != b'"' {
            i += 1;
            continue;
        }
        let start = i + 1;
        let Some(end) = string_end(body, start) else {
            break;
        };
        i = end + 1;
        if is_key(body, i) {
            continue;
        }
        let Some(raw) = body.get(start..end) else {
            break;
        };
        if is_data(raw) {
            continue;
        }
        if let Some(text) = decode(raw) {
            out.push(TextValue {
                span: start..end,
                text,
            });
        }
    }
    out
}

/// Where the string starting at `start` (after its opening quote) ends:
/// the index of its closing quote.
fn string_end(body: &[u8], start: usize) -> Option<usize> {
    let mut i = start;
    loop {
        match body.get(i)? {
            b'\\' => i += 2,
            b'"' => return Some(i),
            _ => i += 1,
        }
    }
}

/// A string followed (after whitespace) by `:` is an object key.
fn is_key(body: &[u8], after: usize) -> bool {
    body.get(after..)
        .unwrap_or_default()
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        == Some(&b':')
}

fn is_data(raw: &[u8]) -> bool {
    raw.starts_with(b"data:")
        || (raw.len() > DATA_BLOB_BYTES && !raw.iter().any(|b| *b == b' ' || *b == b'\\'))
}

/// The string's text; None when its escapes are not valid JSON.
fn decode(raw: &[u8]) -> Option<String> {
    if !raw.contains(&b'\\') {
        return std::str::from_utf8(raw).ok().map(str::to_string);
    }
    let mut quoted = Vec::with_capacity(raw.len() + 2);
    quoted.push(b'"');
    quoted.extend_from_slice(raw);
    quoted.push(b'"');
    serde_json::from_slice(&quoted).ok()
}

/// `text` as the content of a JSON string (no quotes).
pub fn encode(text: &str) -> String {
    let quoted = serde_json::Value::String(text.to_string()).to_string();
    quoted
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or_default()
        .to_string()
}

/// `body` with each (span, new text) edit applied; spans in order and
/// disjoint, as `text_values` gives them.
pub fn rewrite(body: &[u8], edits: &[(Range<usize>, String)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len());
    let mut at = 0;
    for (span, text) in edits {
        out.extend_from_slice(body.get(at..span.start).unwrap_or_default());
        out.extend_from_slice(encode(text).as_bytes());
        at = span.end;
    }
    out.extend_from_slice(body.get(at..).unwrap_or_default());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_not_keys_decoded_and_data_skipped() {
        let blob = "A".repeat(2000);
        let body = format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"line\nwith \"quotes\" \u00e9"}}],
               "image":"data:image/png;base64,AAAA","inline":"{blob}","n":1}}"#
        );
        let texts: Vec<String> = text_values(body.as_bytes())
            .into_iter()
            .map(|v| v.text)
            .collect();
        assert_eq!(texts, ["m", "user", "line\nwith \"quotes\" é"]);
    }

    #[test]
    fn a_rewrite_replaces_only_the_values_and_stays_json() {
        let body = br#"{"a": "mail bob@x.io", "b": ["keep", "tab\tbob@x.io"]}"#;
        let values = text_values(body);
        let edits: Vec<(Range<usize>, String)> = values
            .iter()
            .filter(|v| v.text.contains("bob@x.io"))
            .map(|v| (v.span.clone(), v.text.replace("bob@x.io", "[EMAIL] \"q\"")))
            .collect();
        let out = rewrite(body, &edits);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["a"], "mail [EMAIL] \"q\"");
        assert_eq!(v["b"][0], "keep");
        assert_eq!(v["b"][1], "tab\t[EMAIL] \"q\"");
    }

    #[test]
    fn broken_json_yields_what_was_read() {
        assert_eq!(text_values(br#"{"a": "ok", "b": "unterminated"#).len(), 1);
        assert!(text_values(b"").is_empty());
        assert!(text_values(br#""\"#).is_empty());
    }
}
