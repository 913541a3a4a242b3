//! Streams whose caller and provider speak the same schema (Anthropic to
//! Anthropic, Gemini to Gemini) pass byte for byte. The watchers here read
//! them on the side, for the token counts and for one guarantee: a stream
//! that ends without its schema's proper end gets an error event in that
//! schema appended, so the caller's SDK raises instead of accepting a
//! truncated answer as complete.

use serde_json::Value;

use crate::api::openai::ApiError;
use crate::sse::{SseEvent, SseParser};
use crate::translate::{anthropic_openai, gemini_openai, StreamTranslator, Usage};

fn interrupted(provider: &str) -> ApiError {
    ApiError::new(
        502,
        "server_error",
        Some("stream_interrupted"),
        format!("The {provider} stream ended before completion; the answer is incomplete."),
    )
}

fn n(v: Option<&Value>) -> Option<u64> {
    v.and_then(Value::as_u64)
}

/// What a watcher knows of one schema's stream.
pub trait StreamEnd {
    fn on_event(&mut self, event: SseEvent);
    /// Appends the schema's error event unless the stream ended properly.
    fn finish(&mut self, out: &mut Vec<u8>);
    fn usage(&self) -> Option<Usage>;
}

/// Passes a stream byte for byte while `S` reads its events.
#[derive(Default)]
pub struct StreamWatch<S> {
    parser: SseParser,
    state: S,
}

impl<S: StreamEnd + Default> StreamWatch<S> {
    pub fn new() -> Self {
        Self::default()
    }
}

impl<S: StreamEnd> StreamTranslator for StreamWatch<S> {
    fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        out.extend_from_slice(chunk);
        let state = &mut self.state;
        self.parser.push(chunk, &mut |e| state.on_event(e));
    }

    fn finish(&mut self, out: &mut Vec<u8>) {
        self.state.finish(out);
    }

    fn usage(&self) -> Option<Usage> {
        self.state.usage()
    }
}

pub type AnthropicStreamWatch = StreamWatch<AnthropicStreamEnd>;
pub type GeminiStreamWatch = StreamWatch<GeminiStreamEnd>;

/// Anthropic Messages events: complete at `message_stop`, failed at `error`.
#[derive(Default)]
pub struct AnthropicStreamEnd {
    ended: bool,
    input: u64,
    cache_read: u64,
    cache_creation: u64,
    output: u64,
    seen_usage: bool,
}

impl AnthropicStreamEnd {
    fn take_usage(&mut self, usage: Option<&Value>) {
        let Some(u) = usage.filter(|u| u.is_object()) else {
            return;
        };
        self.seen_usage = true;
        if let Some(x) = n(u.get("input_tokens")) {
            self.input = x;
        }
        if let Some(x) = n(u.get("cache_read_input_tokens")) {
            self.cache_read = x;
        }
        if let Some(x) = n(u.get("cache_creation_input_tokens")) {
            self.cache_creation = x;
        }
        if let Some(x) = n(u.get("output_tokens")) {
            self.output = x;
        }
    }
}

impl StreamEnd for AnthropicStreamEnd {
    fn on_event(&mut self, event: SseEvent) {
        let v: Option<Value> = serde_json::from_str(&event.data).ok();
        let kind = v
            .as_ref()
            .and_then(|v| v.get("type"))
            .and_then(Value::as_str)
            .or(event.event.as_deref())
            .unwrap_or_default();
        match kind {
            "message_stop" | "error" => self.ended = true,
            "message_start" => {
                let usage = v.as_ref().and_then(|v| v.get("message")?.get("usage"));
                self.take_usage(usage);
            }
            "message_delta" => {
                let usage = v.as_ref().and_then(|v| v.get("usage"));
                self.take_usage(usage);
            }
            _ => {}
        }
    }

    fn finish(&mut self, out: &mut Vec<u8>) {
        if self.ended {
            return;
        }
        self.ended = true;
        // A blank line first closes any event the provider left half-written.
        out.extend_from_slice(b"\n\nevent: error\ndata: ");
        out.extend_from_slice(&anthropic_openai::error_body(&interrupted("Anthropic")));
        out.extend_from_slice(b"\n\n");
    }

    fn usage(&self) -> Option<Usage> {
        self.seen_usage.then(|| Usage {
            input_tokens: self
                .input
                .saturating_add(self.cache_read)
                .saturating_add(self.cache_creation),
            output_tokens: self.output,
            cached_input_tokens: self.cache_read,
            reasoning_tokens: 0,
        })
    }
}

/// Gemini SSE: each event a GenerateContentResponse; complete once a
/// candidate carries a `finishReason` (Gemini sends no end marker), failed
/// at an `error` object.
#[derive(Default)]
pub struct GeminiStreamEnd {
    finished: bool,
    failed: bool,
    usage: Option<Usage>,
}

impl StreamEnd for GeminiStreamEnd {
    fn on_event(&mut self, event: SseEvent) {
        let Ok(v) = serde_json::from_str::<Value>(&event.data) else {
            return;
        };
        if v.get("error").is_some() {
            self.failed = true;
        }
        let finished = v
            .get("candidates")
            .and_then(Value::as_array)
            .is_some_and(|c| c.iter().any(|c| c.get("finishReason").is_some()));
        // A blocked prompt has no candidates but is a complete answer.
        let blocked = v
            .get("promptFeedback")
            .and_then(|f| f.get("blockReason"))
            .is_some();
        self.finished |= finished || blocked;
        if let Some(u) = v.get("usageMetadata").filter(|u| u.is_object()) {
            let thoughts = n(u.get("thoughtsTokenCount")).unwrap_or(0);
            self.usage = Some(Usage {
                input_tokens: n(u.get("promptTokenCount"))
                    .unwrap_or(0)
                    .saturating_add(n(u.get("toolUsePromptTokenCount")).unwrap_or(0)),
                output_tokens: n(u.get("candidatesTokenCount"))
                    .unwrap_or(0)
                    .saturating_add(thoughts),
                cached_input_tokens: n(u.get("cachedContentTokenCount")).unwrap_or(0),
                reasoning_tokens: thoughts,
            });
        }
    }

    fn finish(&mut self, out: &mut Vec<u8>) {
        if self.finished || self.failed {
            return;
        }
        self.failed = true;
        out.extend_from_slice(b"\r\n\r\ndata: ");
        out.extend_from_slice(&gemini_openai::error_body(&interrupted("Gemini")));
        out.extend_from_slice(b"\r\n\r\n");
    }

    fn usage(&self) -> Option<Usage> {
        self.usage
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(t: &mut dyn StreamTranslator, input: &str) -> String {
        let mut out = Vec::new();
        for piece in input.as_bytes().chunks(5) {
            t.push(piece, &mut out);
        }
        t.finish(&mut out);
        String::from_utf8(out).unwrap()
    }

    const ANTHROPIC: &str = concat!(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":",
        "{\"input_tokens\":5,\"cache_read_input_tokens\":2,\"output_tokens\":1}}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,",
        "\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":7}}\n\n",
    );

    #[test]
    fn a_complete_anthropic_stream_passes_unchanged_with_its_usage() {
        let full =
            format!("{ANTHROPIC}event: message_stop\ndata: {{\"type\":\"message_stop\"}}\n\n");
        let mut w = AnthropicStreamWatch::new();
        assert_eq!(run(&mut w, &full), full);
        assert_eq!(
            w.usage(),
            Some(Usage {
                input_tokens: 7,
                output_tokens: 7,
                cached_input_tokens: 2,
                reasoning_tokens: 0
            })
        );
    }

    #[test]
    fn a_cut_anthropic_stream_ends_with_an_error_event() {
        let mut w = AnthropicStreamWatch::new();
        let out = run(&mut w, ANTHROPIC);
        assert!(out.starts_with(ANTHROPIC));
        let tail = &out[ANTHROPIC.len()..];
        let data = tail.split("data: ").nth(1).unwrap().trim();
        let v: Value = serde_json::from_str(data).unwrap();
        assert!(tail.contains("event: error\n"));
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "api_error");
        // finish is idempotent; an upstream error event is an end of its own.
        let mut again = Vec::new();
        w.finish(&mut again);
        assert!(again.is_empty());
        let mut e = AnthropicStreamWatch::new();
        let errored = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"x\"}}\n\n";
        assert_eq!(run(&mut e, errored), errored);
    }

    const GEMINI: &str = "data: {\"candidates\":[{\"content\":{\"role\":\"model\",\"parts\":[{\"text\":\"Hi\"}]}}]}\r\n\r\n";

    #[test]
    fn gemini_streams_complete_at_a_finish_reason() {
        let full = format!(
            "{GEMINI}data: {{\"candidates\":[{{\"content\":{{\"parts\":[{{\"text\":\"!\"}}]}},\
             \"finishReason\":\"STOP\"}}],\"usageMetadata\":{{\"promptTokenCount\":4,\
             \"candidatesTokenCount\":2,\"thoughtsTokenCount\":3,\"cachedContentTokenCount\":1}}}}\r\n\r\n"
        );
        let mut w = GeminiStreamWatch::new();
        assert_eq!(run(&mut w, &full), full);
        assert_eq!(
            w.usage(),
            Some(Usage {
                input_tokens: 4,
                output_tokens: 5,
                cached_input_tokens: 1,
                reasoning_tokens: 3
            })
        );
        let mut cut = GeminiStreamWatch::new();
        let out = run(&mut cut, GEMINI);
        let v: Value =
            serde_json::from_str(out[GEMINI.len()..].trim().trim_start_matches("data: ")).unwrap();
        assert_eq!(v["error"]["status"], "UNAVAILABLE");
    }
}
