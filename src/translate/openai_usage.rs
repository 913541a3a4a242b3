//! OpenAI callers reaching OpenAI-shaped providers, streamed: the gateway
//! needs the token counts (quotas, metrics), which OpenAI only reports in a
//! stream when asked with `stream_options.include_usage`.
//!
//! * [`request_usage`] asks for usage in the request, keeping every other
//!   byte, and says whether the caller had asked for it.
//! * [`OpenAiStreamUsage`] reads usage from the stream. When the caller did
//!   not ask, it hides what asking changed: the final `choices: []` chunk and
//!   the `"usage": null` field of the others. When the caller asked, the
//!   stream passes byte for byte, event by event (see `passthrough`).

use std::ops::Range;

use serde_json::Value;

use crate::core::api_error::ApiError;
use crate::core::json::{from_slice_lossy, splice, Field, Kind, TopLevel};
use crate::core::sse::SseEvent;
use crate::core::usage::Usage;
use crate::translate::passthrough::{StreamEnd, StreamWatch, Verdict};

const INCLUDE_USAGE: &[u8] = br#"{"include_usage":true}"#;

fn invalid_json(e: impl std::fmt::Display) -> ApiError {
    ApiError::invalid_request(
        Some("invalid_json"),
        format!("The request body is not a valid JSON object: {e}."),
    )
}

/// An edit of a request body: replace `span` with `bytes`.
pub type Edit = (Range<usize>, Vec<u8>);

/// Makes a streamed chat request ask for usage. `doc` is the parsed `body`.
/// Returns the edit to apply (None when the caller already asked) and
/// whether the caller asked.
pub fn request_usage(body: &[u8], doc: &TopLevel<'_>) -> Result<(Option<Edit>, bool), ApiError> {
    let field = doc.get("stream_options").map_err(|_| {
        ApiError::invalid_request(
            Some("duplicate_parameter"),
            "The parameter 'stream_options' is given more than once.".into(),
        )
        .with_param("stream_options")
    })?;
    let Some(field) = field else {
        // Insert before the closing brace; an empty object takes no comma.
        let close = body.iter().rposition(|&b| b == b'}').unwrap_or(body.len());
        let insert: &[u8] = if doc.fields().is_empty() {
            br#""stream_options":{"include_usage":true}"#
        } else {
            br#","stream_options":{"include_usage":true}"#
        };
        return Ok((Some((close..close, insert.to_vec())), false));
    };
    match field.kind {
        Kind::Null => Ok((Some((field.value.clone(), INCLUDE_USAGE.to_vec())), false)),
        Kind::Object => {
            let mut options: serde_json::Map<String, Value> =
                serde_json::from_slice(doc.raw(field)).map_err(invalid_json)?;
            match options.get("include_usage") {
                Some(Value::Bool(true)) => Ok((None, true)),
                None | Some(Value::Null) | Some(Value::Bool(false)) => {
                    options.insert("include_usage".into(), Value::Bool(true));
                    let value = serde_json::to_vec(&options).map_err(invalid_json)?;
                    Ok((Some((field.value.clone(), value)), false))
                }
                Some(_) => Err(ApiError::invalid_request(
                    Some("invalid_type"),
                    "Invalid type for 'stream_options.include_usage': expected a boolean.".into(),
                )
                .with_param("stream_options")),
            }
        }
        other => Err(ApiError::invalid_request(
            Some("invalid_type"),
            format!(
                "Invalid type for 'stream_options': expected an object, but got {}.",
                other.name()
            ),
        )
        .with_param("stream_options")),
    }
}

/// Usage from an OpenAI `usage` object.
pub fn parse_usage(usage: &Value) -> Option<Usage> {
    let n = |v: Option<&Value>| v.and_then(Value::as_u64).unwrap_or(0);
    usage.is_object().then(|| Usage {
        input_tokens: n(usage.get("prompt_tokens")),
        output_tokens: n(usage.get("completion_tokens")),
        cached_input_tokens: n(usage
            .get("prompt_tokens_details")
            .and_then(|d| d.get("cached_tokens"))),
        reasoning_tokens: n(usage
            .get("completion_tokens_details")
            .and_then(|d| d.get("reasoning_tokens"))),
    })
}

/// Reads usage from an OpenAI chunk stream; hides it when the caller did not ask.
pub type OpenAiStreamUsage = StreamWatch<OpenAiStreamEnd>;

impl OpenAiStreamUsage {
    /// `hide`: the caller did not ask for usage, so the stream is given back
    /// without what asking changed.
    pub fn hiding(hide: bool) -> Self {
        StreamWatch::watching(OpenAiStreamEnd {
            hide,
            usage: None,
            ended: false,
        })
    }
}

/// What [`OpenAiStreamUsage`] knows of an OpenAI chunk stream.
pub struct OpenAiStreamEnd {
    hide: bool,
    usage: Option<Usage>,
    /// `[DONE]` or an error event went by: the stream has its own end.
    ended: bool,
}

/// The usage of the `usage` field, when it is an object.
fn field_usage(doc: &TopLevel<'_>, field: &Field) -> Option<Usage> {
    if field.kind != Kind::Object {
        return None;
    }
    let value: Value = from_slice_lossy(doc.raw(field)).ok()?;
    parse_usage(&value)
}

/// The chunk `doc` (of `bytes`) without its `usage` field, or None to drop
/// the chunk (the usage-only one: no choices, a usage object).
fn strip_usage(
    doc: &TopLevel<'_>,
    bytes: &[u8],
    field: &Field,
    has_usage: bool,
) -> Option<Vec<u8>> {
    let no_choices = matches!(doc.get("choices"), Ok(Some(c)) if c.kind == Kind::Array
        && doc.raw(c).iter().filter(|b| !b.is_ascii_whitespace()).eq(b"[]".iter()));
    if no_choices && has_usage {
        return None;
    }
    Some(remove_field(bytes, field.key.start - 1, field.value.end))
}

/// Removes the member spanning `start..end` (key quote to value end) and one
/// adjacent comma.
fn remove_field(doc_bytes: &[u8], start: usize, end: usize) -> Vec<u8> {
    let before = doc_bytes[..start]
        .iter()
        .rposition(|b| !b.is_ascii_whitespace());
    if let Some(i) = before.filter(|&i| doc_bytes[i] == b',') {
        return splice(doc_bytes, i..end, b"");
    }
    let after = doc_bytes[end..]
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .map(|i| end + i);
    match after.filter(|&i| doc_bytes[i] == b',') {
        Some(i) => splice(doc_bytes, start..i + 1, b""),
        None => splice(doc_bytes, start..end, b""),
    }
}

impl StreamEnd for OpenAiStreamEnd {
    const PROVIDER: &'static str = "provider's";

    fn on_event(&mut self, event: SseEvent) -> Verdict {
        let data = event.data.as_bytes();
        if event.data.trim() == "[DONE]" {
            self.ended = true;
            return Verdict::Forward;
        }
        // Every chunk is validated (the scanner costs a fraction of a
        // parse); only those that mention usage are looked at closer.
        let Ok(doc) = TopLevel::parse(data) else {
            return Verdict::Corrupt;
        };
        if let Ok(Some(error)) = doc.get("error") {
            self.ended |= error.kind != Kind::Null;
        }
        if !event.data.contains("\"usage\"") {
            return Verdict::Forward;
        }
        let Ok(Some(field)) = doc.get("usage") else {
            return Verdict::Forward;
        };
        let usage = field_usage(&doc, field);
        if usage.is_some() {
            self.usage = usage;
        }
        if !self.hide {
            return Verdict::Forward;
        }
        let mut kept = Vec::new();
        if let Some(chunk) = strip_usage(&doc, data, field, usage.is_some()) {
            kept.reserve(chunk.len() + 8);
            kept.extend_from_slice(b"data: ");
            kept.extend_from_slice(&chunk);
            kept.extend_from_slice(b"\n\n");
        }
        Verdict::Replace(kept)
    }

    fn fail(&mut self, error: &ApiError, out: &mut Vec<u8>) {
        self.ended = true;
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(&error.body());
        out.extend_from_slice(b"\n\n");
    }

    /// A stream that stopped without `[DONE]` or an error event of its own
    /// gets an OpenAI error event, so the SDK raises instead of accepting a
    /// truncated answer.
    fn ended(&self) -> bool {
        self.ended
    }

    fn usage(&self) -> Option<Usage> {
        self.usage
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::StreamTranslator;

    /// The request with the usage edit applied, as the filter sends it.
    fn request_usage(body: &[u8]) -> Result<(Option<Vec<u8>>, bool), ApiError> {
        let doc = TopLevel::parse(body).map_err(invalid_json)?;
        let (edit, asked) = super::request_usage(body, &doc)?;
        Ok((edit.map(|(span, bytes)| splice(body, span, &bytes)), asked))
    }

    #[test]
    fn asks_for_usage_keeping_other_bytes() {
        let (body, asked) = request_usage(br#"{"model":"m", "stream": true}"#).unwrap();
        assert!(!asked);
        assert_eq!(
            body.unwrap(),
            br#"{"model":"m", "stream": true,"stream_options":{"include_usage":true}}"#
        );
        let (body, asked) =
            request_usage(br#"{"stream":true,"stream_options":{"include_usage":true}}"#).unwrap();
        assert!(asked);
        assert!(body.is_none());
        let (body, asked) =
            request_usage(br#"{"stream":true,"stream_options":{"include_usage":false}}"#).unwrap();
        assert!(!asked);
        assert_eq!(
            body.unwrap(),
            br#"{"stream":true,"stream_options":{"include_usage":true}}"#
        );
        let (body, _) = request_usage(br#"{"stream_options":null}"#).unwrap();
        assert_eq!(
            body.unwrap(),
            br#"{"stream_options":{"include_usage":true}}"#
        );
        let (body, _) = request_usage(b"{ }").unwrap();
        assert_eq!(
            body.unwrap(),
            br#"{ "stream_options":{"include_usage":true}}"#
        );
        let e = request_usage(br#"{"stream_options":3}"#).unwrap_err();
        assert_eq!((e.status, e.param), (400, Some("stream_options")));
    }

    const STREAM: &str = concat!(
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"usage\":null,\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
        "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,",
        "\"total_tokens\":11,\"prompt_tokens_details\":{\"cached_tokens\":4},",
        "\"completion_tokens_details\":{\"reasoning_tokens\":1}}}\n\n",
        "data: [DONE]\n\n"
    );

    fn run(hide: bool, pieces: &[&[u8]]) -> (String, Option<Usage>) {
        let mut t = OpenAiStreamUsage::hiding(hide);
        let mut out = Vec::new();
        for p in pieces {
            t.push(p, &mut out);
        }
        t.finish(&mut out);
        (String::from_utf8(out).unwrap(), t.usage())
    }

    #[test]
    fn hides_usage_from_callers_who_did_not_ask() {
        let want = Usage {
            input_tokens: 9,
            output_tokens: 2,
            cached_input_tokens: 4,
            reasoning_tokens: 1,
        };
        let expected = concat!(
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n",
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
            "data: [DONE]\n\n"
        );
        let whole = run(true, &[STREAM.as_bytes()]);
        assert_eq!(whole, (expected.to_string(), Some(want)));
        let bytes: Vec<&[u8]> = STREAM.as_bytes().chunks(1).collect();
        assert_eq!(run(true, &bytes), (expected.to_string(), Some(want)));
        // Rewritten chunks take `\n\n`; the others keep the provider's bytes.
        let crlf = STREAM.replace('\n', "\r\n");
        let expected_crlf = expected.replace("data: [DONE]\n\n", "data: [DONE]\r\n\r\n");
        assert_eq!(run(true, &[crlf.as_bytes()]), (expected_crlf, Some(want)));
    }

    #[test]
    fn passes_usage_through_byte_for_byte_when_asked() {
        let bytes: Vec<&[u8]> = STREAM.as_bytes().chunks(7).collect();
        let (out, usage) = run(false, &bytes);
        assert_eq!(out, STREAM);
        assert_eq!(usage.unwrap().input_tokens, 9);
    }

    #[test]
    fn a_stream_cut_before_done_ends_with_an_error_event() {
        let cut = &STREAM[..STREAM.find("data: [DONE]").unwrap()];
        let (out, _) = run(false, &[cut.as_bytes()]);
        let tail = out.strip_prefix(cut).unwrap();
        let v: Value = serde_json::from_str(tail.trim().strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(v["error"]["code"], "stream_interrupted");
        let errored = "data: {\"error\":{\"message\":\"boom\"}}\n\n";
        assert_eq!(run(true, &[errored.as_bytes()]).0, errored);
    }

    #[test]
    fn removes_a_leading_usage_member() {
        let strip = |chunk: &str| {
            let doc = TopLevel::parse(chunk.as_bytes()).unwrap();
            let field = doc.get("usage").unwrap().unwrap();
            strip_usage(&doc, chunk.as_bytes(), field, false)
        };
        assert_eq!(
            strip(r#"{"usage": null , "id":"x"}"#).unwrap(),
            br#"{ "id":"x"}"#
        );
        assert_eq!(strip(r#"{"usage":null}"#).unwrap(), b"{}");
    }
}
