//! Translation between the API schemas callers speak and the native APIs of
//! providers.
//!
//! OpenAI Chat Completions is the pivot: every other schema has one module
//! per direction to or from it, so N inbound APIs and M provider APIs need
//! N + M translators, not N × M. A caller and a provider that speak the same
//! schema skip translation entirely (only `model` is rewritten).
//!
//! | module               | caller speaks            | provider speaks                           |
//! |----------------------|--------------------------|-------------------------------------------|
//! | `outbound/anthropic` | OpenAI (the pivot)       | Anthropic Messages (also on Vertex AI)    |
//! | `outbound/gemini`    | OpenAI (the pivot)       | Gemini `generateContent` (also Vertex AI) |
//! | `outbound/bedrock`   | OpenAI (the pivot)       | AWS Bedrock Converse                      |
//! | `inbound/anthropic`  | Anthropic Messages       | OpenAI (the pivot)                        |
//! | `inbound/gemini`     | Gemini `generateContent` | OpenAI (the pivot)                        |
//! | `openai_usage`       | OpenAI                   | OpenAI (usage read from streams)          |
//! | `inbound/responses`  | OpenAI Responses         | OpenAI (the pivot)                        |
//! | `passthrough`        | Anthropic, Gemini, Responses | the same schema (streams watched)     |
//!
//! `inbound/` translators implement `inbound::CallerTranslator` and
//! `outbound/` ones `outbound::ProviderTranslator`; `exchange` picks them
//! and chains them through the pivot. The pivot request is read once, into
//! `pivot::ChatRequest`, where every parameter all providers read is
//! checked; an outbound translator only writes its API's body from it and
//! refuses what its API cannot do. Every translating stream is a
//! `stream::EventStream`: it owns the framing (SSE or AWS event-stream),
//! faults and the end, and the translator supplies only the per-event
//! mapping (`stream::EventMapping`).
//!
//! Each module is pure: bytes in, bytes out, no host calls, so the filter
//! decides when to call it and the logic is tested natively.
//!
//! The streaming contract, shared by every translator so they chain:
//! the pivot stream is OpenAI's `chat.completion.chunk` SSE. A stream that
//! completed ends with `data: [DONE]`; a stream that broke ends with an
//! OpenAI error event (`data: {"error":{...}}`) and no `[DONE]`. A translator
//! from the pivot turns that error event (or a stream that ends without
//! `[DONE]`) into its own schema's error event.
//!
//! An upstream event the gateway cannot read (data that is not JSON, a frame
//! that does not decode) or will not hold (over `sse::MAX_EVENT_BYTES`) is
//! a [`StreamFault`]: the caller's stream ends there with an error event and
//! nothing after it, never with a hole in the text and a clean end.

pub mod chat_input;
pub mod chat_output;
pub mod exchange;
#[cfg(test)]
mod golden_tests;
pub mod inbound;
pub mod openai_usage;
pub mod outbound;
pub mod passthrough;
pub mod pivot;
pub mod scrub;
pub mod stream;
#[cfg(test)]
mod stream_faults_tests;

use crate::core::api_error::ApiError;
use crate::core::schema::Schema;
use crate::core::sse::MAX_EVENT_BYTES;
use crate::core::usage::Usage;

/// An incremental stream translator: upstream body chunks in, the caller's
/// stream out. Every event a chunk completes is translated at once; partial
/// events wait for the next chunk.
pub trait StreamTranslator {
    /// Appends to `out` the translation of every event `chunk` completes.
    fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>);
    /// The upstream body ended. A stream that did not complete properly
    /// gets an error event in the output schema, never a clean end.
    fn finish(&mut self, out: &mut Vec<u8>);
    /// Token counts reported so far, if any.
    fn usage(&self) -> Option<Usage>;
}

/// The most one pivot event may hold. The pivot is the gateway's own
/// rewrite of provider events of up to `MAX_EVENT_BYTES`, whose text keeps
/// its size while the envelope around it (id, model, index) adds a little:
/// 1 MiB of room for that.
pub const MAX_PIVOT_EVENT_BYTES: usize = MAX_EVENT_BYTES + 1024 * 1024;

/// Why the gateway ended a provider's stream early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamFault {
    /// An event whose data is not JSON, or a frame that does not decode.
    Corrupt,
    /// An event larger than the gateway holds (`sse::MAX_EVENT_BYTES`).
    Oversized,
}

impl StreamFault {
    /// The error the caller's stream ends with; `provider` names the API
    /// ("Anthropic", "Gemini", ...). It never quotes the event.
    pub fn error(self, provider: &str) -> ApiError {
        let (code, what) = match self {
            StreamFault::Corrupt => (
                "invalid_provider_response",
                "an event the gateway could not read".to_string(),
            ),
            StreamFault::Oversized => (
                "provider_event_too_large",
                format!("an event larger than {} MiB", MAX_EVENT_BYTES >> 20),
            ),
        };
        ApiError::new(
            502,
            "server_error",
            Some(code),
            format!("The {provider} stream sent {what}; the answer is incomplete."),
        )
    }
}

/// Two translators in series: provider schema -> pivot -> caller schema.
pub struct Chain<A, B> {
    pub first: A,
    pub second: B,
    scratch: Vec<u8>,
}

impl<A: StreamTranslator, B: StreamTranslator> Chain<A, B> {
    pub fn new(first: A, second: B) -> Self {
        Chain {
            first,
            second,
            scratch: Vec::new(),
        }
    }
}

impl<A: StreamTranslator, B: StreamTranslator> StreamTranslator for Chain<A, B> {
    fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        self.scratch.clear();
        self.first.push(chunk, &mut self.scratch);
        if !self.scratch.is_empty() {
            self.second.push(&self.scratch, out);
        }
    }

    fn finish(&mut self, out: &mut Vec<u8>) {
        self.scratch.clear();
        self.first.finish(&mut self.scratch);
        self.second.push(&self.scratch, out);
        self.second.finish(out);
    }

    /// The provider side knows the real counts.
    fn usage(&self) -> Option<Usage> {
        self.first.usage().or_else(|| self.second.usage())
    }
}

impl<T: StreamTranslator + ?Sized> StreamTranslator for Box<T> {
    fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        (**self).push(chunk, out)
    }
    fn finish(&mut self, out: &mut Vec<u8>) {
        (**self).finish(out)
    }
    fn usage(&self) -> Option<Usage> {
        (**self).usage()
    }
}

/// A request body as the JSON object every API requires, or the caller's
/// `invalid_json` error.
pub(crate) fn request_object(
    body: &[u8],
) -> Result<serde_json::Map<String, serde_json::Value>, ApiError> {
    match serde_json::from_slice(body) {
        Ok(serde_json::Value::Object(req)) => Ok(req),
        Ok(_) => Err(ApiError::invalid_request(
            Some("invalid_json"),
            "The request body must be a JSON object.".into(),
        )),
        Err(e) => Err(ApiError::invalid_request(
            Some("invalid_json"),
            format!("The request body is not valid JSON: {e}."),
        )),
    }
}

/// The token counts in a complete (non-streamed) answer in `schema`, read
/// from its usage object alone; None when it reports none.
pub fn usage_of_answer(schema: Schema, body: &[u8]) -> Option<Usage> {
    use crate::core::json::TopLevel;
    let doc = TopLevel::parse(body).ok()?;
    let field = match schema {
        Schema::Gemini => "usageMetadata",
        _ => "usage",
    };
    // Only the usage object is read, field by field, from the spans the
    // scanner recorded: no `Value` of the answer or of the object.
    let usage = TopLevel::parse(doc.raw(doc.get(field).ok()??)).ok()?;
    let count = |path: &[&str]| -> Option<u64> {
        let (last, parents) = path.split_last()?;
        let mut inner = None;
        for key in parents {
            let within = inner.as_ref().unwrap_or(&usage);
            let field = within
                .last(key)
                .filter(|f| f.kind == crate::core::json::Kind::Object)?;
            inner = Some(TopLevel::parse(within.raw(field)).ok()?);
        }
        let within = inner.as_ref().unwrap_or(&usage);
        within.u64_value(within.last(last)?)
    };
    let n = |path: &[&str]| count(path).unwrap_or(0);
    let has = |path: &[&str]| count(path).is_some();
    let usage = match schema {
        // Image and audio answers count as the Responses API does.
        Schema::OpenAi if !has(&["prompt_tokens"]) && has(&["input_tokens"]) => Usage {
            input_tokens: n(&["input_tokens"]),
            output_tokens: n(&["output_tokens"]),
            cached_input_tokens: n(&["input_tokens_details", "cached_tokens"]),
            reasoning_tokens: 0,
        },
        Schema::OpenAi => {
            if !has(&["prompt_tokens"]) {
                return None;
            }
            Usage {
                input_tokens: n(&["prompt_tokens"]),
                output_tokens: n(&["completion_tokens"]),
                cached_input_tokens: n(&["prompt_tokens_details", "cached_tokens"]),
                reasoning_tokens: n(&["completion_tokens_details", "reasoning_tokens"]),
            }
        }
        Schema::Anthropic => {
            if !has(&["input_tokens"]) && !has(&["output_tokens"]) {
                return None;
            }
            let read = n(&["cache_read_input_tokens"]);
            Usage {
                input_tokens: n(&["input_tokens"])
                    .saturating_add(read)
                    .saturating_add(n(&["cache_creation_input_tokens"])),
                output_tokens: n(&["output_tokens"]),
                cached_input_tokens: read,
                reasoning_tokens: 0,
            }
        }
        Schema::Gemini => {
            if !has(&["promptTokenCount"]) {
                return None;
            }
            let thoughts = n(&["thoughtsTokenCount"]);
            Usage {
                input_tokens: n(&["promptTokenCount"]),
                output_tokens: n(&["candidatesTokenCount"]).saturating_add(thoughts),
                cached_input_tokens: n(&["cachedContentTokenCount"]),
                reasoning_tokens: thoughts,
            }
        }
        Schema::Responses => {
            if !has(&["input_tokens"]) {
                return None;
            }
            Usage {
                input_tokens: n(&["input_tokens"]),
                output_tokens: n(&["output_tokens"]),
                cached_input_tokens: n(&["input_tokens_details", "cached_tokens"]),
                reasoning_tokens: n(&["output_tokens_details", "reasoning_tokens"]),
            }
        }
        Schema::Converse => {
            if !has(&["inputTokens"]) {
                return None;
            }
            let read = n(&["cacheReadInputTokens"]);
            Usage {
                input_tokens: n(&["inputTokens"])
                    .saturating_add(read)
                    .saturating_add(n(&["cacheWriteInputTokens"])),
                output_tokens: n(&["outputTokens"]),
                cached_input_tokens: read,
                reasoning_tokens: 0,
            }
        }
    };
    Some(usage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_of_answers_in_every_schema() {
        let u = |i, o, c, r| {
            Some(Usage {
                input_tokens: i,
                output_tokens: o,
                cached_input_tokens: c,
                reasoning_tokens: r,
            })
        };
        let cases: &[(Schema, &str, Option<Usage>)] = &[
            (
                Schema::OpenAi,
                r#"{"id":"x","usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15,
                "prompt_tokens_details":{"cached_tokens":4},"completion_tokens_details":{"reasoning_tokens":2}}}"#,
                u(10, 5, 4, 2),
            ),
            (
                Schema::OpenAi,
                r#"{"object":"list","data":[],"usage":{"prompt_tokens":7,"total_tokens":7}}"#,
                u(7, 0, 0, 0),
            ),
            (Schema::OpenAi, r#"{"id":"x","usage":null}"#, None),
            (Schema::OpenAi, r#"{"id":"x"}"#, None),
            (
                Schema::Anthropic,
                r#"{"type":"message","usage":{"input_tokens":3,"cache_read_input_tokens":8,
                "cache_creation_input_tokens":2,"output_tokens":9}}"#,
                u(13, 9, 8, 0),
            ),
            (
                Schema::Gemini,
                r#"{"candidates":[],"usageMetadata":{"promptTokenCount":11,"candidatesTokenCount":6,
                "thoughtsTokenCount":3,"cachedContentTokenCount":5}}"#,
                u(11, 9, 5, 3),
            ),
            (
                Schema::Converse,
                r#"{"output":{},"usage":{"inputTokens":4,"outputTokens":2,"cacheReadInputTokens":1}}"#,
                u(5, 2, 1, 0),
            ),
            (Schema::OpenAi, "not json", None),
            // What `serde_json::Value` made of these: the last of repeated
            // keys wins; only whole non-negative numbers that fit a u64 count.
            (
                Schema::OpenAi,
                r#"{"usage":{"prompt_tokens":1,"prompt_tokens":6,"completion_tokens":2.0,
                "prompt_tokens_details":{"cached_tokens":-1},"completion_tokens_details":[3]}}"#,
                u(6, 0, 0, 0),
            ),
            (
                Schema::OpenAi,
                r#"{"usage":{"prompt_tokens":1e2,"completion_tokens":3}}"#,
                None,
            ),
            (
                Schema::OpenAi,
                r#"{"usage":{"prompt_tokens":18446744073709551616}}"#,
                None,
            ),
            (
                Schema::OpenAi,
                r#"{"usage":{"prompt_tokens":18446744073709551615,
                "prompt_tokens_details":{"cached_tokens":1,"cached_tokens":4}}}"#,
                u(u64::MAX, 0, 4, 0),
            ),
            (
                Schema::Anthropic,
                r#"{"usage":{"output_tokens":"9"}}"#,
                None,
            ),
            (Schema::Anthropic, r#"{"usage":[1]}"#, None),
            (
                Schema::Anthropic,
                r#"{"usage":{"output_tokens":9}} x"#,
                None,
            ),
            (
                Schema::Anthropic,
                r#"{"usage":{"output_tokens":9},"usage":{"output_tokens":9}}"#,
                None,
            ),
            (
                Schema::Anthropic,
                r#"{"usage":{"\u006fu\u0074put_tokens":9}}"#,
                u(0, 9, 0, 0),
            ),
        ];
        for (schema, body, want) in cases {
            assert_eq!(usage_of_answer(*schema, body.as_bytes()), *want, "{body}");
        }
    }
}
