//! Streams whose caller and provider speak the same schema (OpenAI to
//! OpenAI-shaped, Anthropic to Anthropic, Gemini to Gemini, Responses to
//! OpenAI's Responses) pass event by
//! event, each complete event byte for byte. The watchers here read them on
//! the side, for the token counts and for two guarantees:
//!
//! * a stream that ends without its schema's proper end gets an error event
//!   in that schema appended, so the caller's SDK raises instead of
//!   accepting a truncated answer as complete;
//! * an event the watcher cannot read (data that is not JSON) or hold (over
//!   `sse::MAX_EVENT_BYTES`) is not passed on: the stream ends there with an
//!   error event, and nothing the provider sends after it goes out.
//!
//! Only whole events go out: the bytes of the event still arriving wait
//! (never more than one event), so whatever scans the output (provider keys,
//! see `scrub`) always sees an event entire, never half of it.

use serde_json::Value;

use crate::core::api_error::ApiError;
use crate::core::json::from_str_lossy;
use crate::core::sse::{SseEvent, SseParser};
use crate::core::usage::Usage;
use crate::translate::inbound::{
    anthropic as anthropic_caller, gemini as gemini_caller, responses as responses_caller,
};
use crate::translate::stream::interrupted;
use crate::translate::{StreamFault, StreamTranslator};

/// Tails grown past this by a large event are freed once it went out.
const KEPT_TAIL_BYTES: usize = 64 * 1024;

fn n(v: Option<&Value>) -> Option<u64> {
    v.and_then(Value::as_u64)
}

/// What goes out for one upstream event.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The event's own bytes.
    Forward,
    /// These bytes instead (none: the event is dropped).
    Replace(Vec<u8>),
    /// The event cannot be read: the stream ends with an error here.
    Corrupt,
}

/// What a watcher knows of one schema's stream.
pub trait StreamEnd {
    /// The API's name in error messages ("Anthropic", ...).
    const PROVIDER: &'static str;
    fn on_event(&mut self, event: SseEvent) -> Verdict;
    /// Appends the schema's error event for `error`; the stream has ended.
    fn fail(&mut self, error: &ApiError, out: &mut Vec<u8>);
    /// The stream reached its schema's end (or its own error event).
    fn ended(&self) -> bool;
    fn usage(&self) -> Option<Usage>;
}

/// Passes a stream event by event while `S` reads it.
#[derive(Default)]
pub struct StreamWatch<S> {
    parser: SseParser,
    /// Raw bytes of the event still arriving, not passed on yet.
    tail: Vec<u8>,
    /// The watcher ended the stream with an error: nothing more goes out.
    failed: bool,
    state: S,
}

impl<S: StreamEnd + Default> StreamWatch<S> {
    pub fn new() -> Self {
        Self::default()
    }
}

impl<S: StreamEnd> StreamWatch<S> {
    pub fn watching(state: S) -> Self {
        StreamWatch {
            parser: SseParser::default(),
            tail: Vec::new(),
            failed: false,
            state,
        }
    }

    /// Sends the waiting tail, then `chunk[from..to]`.
    fn send(tail: &mut Vec<u8>, chunk: &[u8], from: usize, to: usize, out: &mut Vec<u8>) {
        out.append(tail);
        if tail.capacity() > KEPT_TAIL_BYTES {
            *tail = Vec::new();
        }
        out.extend_from_slice(chunk.get(from..to).unwrap_or_default());
    }
}

impl<S: StreamEnd> StreamTranslator for StreamWatch<S> {
    fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        if self.failed {
            return;
        }
        let Self {
            parser,
            tail,
            state,
            ..
        } = self;
        // Bytes of `chunk` already sent (or dropped with their event).
        let mut sent = 0;
        // Where the unreadable event began, if one came.
        let mut corrupt_at = None;
        parser.push_spans(chunk, &mut |event, span| {
            if corrupt_at.is_some() {
                return;
            }
            match state.on_event(event) {
                Verdict::Forward => Self::send(tail, chunk, sent, span.end, out),
                Verdict::Replace(bytes) => {
                    tail.clear();
                    out.extend_from_slice(&bytes);
                }
                Verdict::Corrupt => {
                    corrupt_at = Some(span.start);
                    return;
                }
            }
            sent = span.end;
        });
        // Blocks that ended before the fault (or the chunk's end) go out:
        // comments, and the LF of a CRLF the last chunk cut.
        let (settled, fault) = match corrupt_at {
            Some(start) => (start, Some(StreamFault::Corrupt)),
            None if parser.overflowed() => (parser.settled(), Some(StreamFault::Oversized)),
            None => (parser.settled(), None),
        };
        if settled > sent {
            Self::send(tail, chunk, sent, settled, out);
            sent = settled;
        }
        if let Some(fault) = fault {
            log::warn!("ending a {} stream early: {fault:?} event", S::PROVIDER);
            self.failed = true;
            self.tail = Vec::new();
            self.state.fail(&fault.error(S::PROVIDER), out);
            return;
        }
        tail.extend_from_slice(chunk.get(sent..).unwrap_or_default());
    }

    /// An event left unfinished is never dispatched by an SSE reader, so it
    /// is dropped rather than sent half.
    fn finish(&mut self, out: &mut Vec<u8>) {
        self.tail = Vec::new();
        if self.failed || self.state.ended() {
            return;
        }
        self.state.fail(&interrupted(S::PROVIDER), out);
    }

    fn usage(&self) -> Option<Usage> {
        self.state.usage()
    }
}

pub type AnthropicStreamWatch = StreamWatch<AnthropicStreamEnd>;
pub type GeminiStreamWatch = StreamWatch<GeminiStreamEnd>;
pub type ResponsesStreamWatch = StreamWatch<ResponsesStreamEnd>;

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
    const PROVIDER: &'static str = "Anthropic";

    fn on_event(&mut self, event: SseEvent) -> Verdict {
        let Ok(v) = from_str_lossy::<Value>(&event.data) else {
            return Verdict::Corrupt;
        };
        let kind = v
            .get("type")
            .and_then(Value::as_str)
            .or(event.event.as_deref())
            .unwrap_or_default();
        match kind {
            "message_stop" | "error" => self.ended = true,
            "message_start" => {
                let usage = v.get("message").and_then(|m| m.get("usage"));
                self.take_usage(usage);
            }
            "message_delta" => self.take_usage(v.get("usage")),
            _ => {}
        }
        Verdict::Forward
    }

    fn fail(&mut self, error: &ApiError, out: &mut Vec<u8>) {
        self.ended = true;
        out.extend_from_slice(b"event: error\ndata: ");
        out.extend_from_slice(&anthropic_caller::error_body(error));
        out.extend_from_slice(b"\n\n");
    }

    fn ended(&self) -> bool {
        self.ended
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
    const PROVIDER: &'static str = "Gemini";

    fn on_event(&mut self, event: SseEvent) -> Verdict {
        let Ok(v) = from_str_lossy::<Value>(&event.data) else {
            return Verdict::Corrupt;
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
        Verdict::Forward
    }

    fn fail(&mut self, error: &ApiError, out: &mut Vec<u8>) {
        self.failed = true;
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(&gemini_caller::error_body(error));
        out.extend_from_slice(b"\r\n\r\n");
    }

    fn ended(&self) -> bool {
        self.finished || self.failed
    }

    fn usage(&self) -> Option<Usage> {
        self.usage
    }
}

/// OpenAI Responses events, served by OpenAI as themselves: complete at
/// `response.completed` or `response.incomplete`, failed at
/// `response.failed` or `error`. A stream that breaks gets `error` then
/// `response.failed`, numbered after the last event, as OpenAI ends one.
#[derive(Default)]
pub struct ResponsesStreamEnd {
    ended: bool,
    /// The last `sequence_number` seen.
    sequence: Option<u64>,
    /// The response as its opening events described it.
    response: Option<Value>,
    usage: Option<Usage>,
}

impl ResponsesStreamEnd {
    fn emit(&mut self, kind: &str, event: Value, out: &mut Vec<u8>) {
        let sequence = self.sequence.map_or(0, |s| s.saturating_add(1));
        self.sequence = Some(sequence);
        responses_caller::write_event(out, kind, sequence, event);
    }
}

impl StreamEnd for ResponsesStreamEnd {
    const PROVIDER: &'static str = "OpenAI";

    fn on_event(&mut self, event: SseEvent) -> Verdict {
        let Ok(v) = from_str_lossy::<Value>(&event.data) else {
            return Verdict::Corrupt;
        };
        if let Some(s) = n(v.get("sequence_number")) {
            self.sequence = Some(s);
        }
        let kind = v
            .get("type")
            .and_then(Value::as_str)
            .or(event.event.as_deref())
            .unwrap_or_default();
        match kind {
            "response.created" | "response.in_progress" => {
                self.response = v.get("response").cloned();
            }
            "response.completed" | "response.incomplete" | "response.failed" => {
                self.ended = true;
                let usage = v.get("response").and_then(|r| r.get("usage"));
                if let Some(u) = usage.filter(|u| u.get("input_tokens").is_some()) {
                    let at = |p: &str| n(u.pointer(p)).unwrap_or(0);
                    self.usage = Some(Usage {
                        input_tokens: at("/input_tokens"),
                        output_tokens: at("/output_tokens"),
                        cached_input_tokens: at("/input_tokens_details/cached_tokens"),
                        reasoning_tokens: at("/output_tokens_details/reasoning_tokens"),
                    });
                }
            }
            "error" => self.ended = true,
            _ => {}
        }
        Verdict::Forward
    }

    fn fail(&mut self, error: &ApiError, out: &mut Vec<u8>) {
        self.ended = true;
        let code = error.code.unwrap_or("server_error");
        self.emit(
            "error",
            serde_json::json!({"code": code, "message": error.message, "param": null}),
            out,
        );
        let mut response = self.response.take().unwrap_or_else(
            || serde_json::json!({"id": "", "object": "response", "created_at": 0, "output": []}),
        );
        response["status"] = Value::String("failed".into());
        let kind = if code.contains("rate_limit") {
            "rate_limit_exceeded"
        } else {
            "server_error"
        };
        response["error"] = serde_json::json!({"code": kind, "message": error.message});
        self.emit(
            "response.failed",
            serde_json::json!({"response": response}),
            out,
        );
    }

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

    const RESPONSES: &str = concat!(
        "event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0,",
        "\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"in_progress\",",
        "\"output\":[]}}\n\n",
        "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",",
        "\"sequence_number\":1,\"delta\":\"Hi\"}\n\n",
    );

    fn events(text: &str) -> Vec<Value> {
        text.split("\n\n")
            .filter_map(|e| e.split_once("data: "))
            .map(|(_, d)| serde_json::from_str(d).unwrap())
            .collect()
    }

    #[test]
    fn a_complete_responses_stream_passes_unchanged_with_its_usage() {
        let full = format!(
            "{RESPONSES}event: response.completed\ndata: {{\"type\":\"response.completed\",\
             \"sequence_number\":2,\"response\":{{\"id\":\"resp_1\",\"usage\":{{\
             \"input_tokens\":9,\"input_tokens_details\":{{\"cached_tokens\":4}},\
             \"output_tokens\":6,\"output_tokens_details\":{{\"reasoning_tokens\":2}}}}}}}}\n\n"
        );
        let mut w = ResponsesStreamWatch::new();
        assert_eq!(run(&mut w, &full), full);
        assert_eq!(
            w.usage(),
            Some(Usage {
                input_tokens: 9,
                output_tokens: 6,
                cached_input_tokens: 4,
                reasoning_tokens: 2
            })
        );
    }

    #[test]
    fn a_cut_responses_stream_ends_with_error_then_response_failed_in_sequence() {
        let mut w = ResponsesStreamWatch::new();
        let out = run(&mut w, RESPONSES);
        assert!(out.starts_with(RESPONSES));
        let tail = events(&out[RESPONSES.len()..]);
        assert_eq!(tail.len(), 2, "{out}");
        assert_eq!(tail[0]["type"], "error");
        assert_eq!(tail[0]["sequence_number"], 2);
        assert_eq!(tail[1]["type"], "response.failed");
        assert_eq!(tail[1]["sequence_number"], 3);
        assert_eq!(tail[1]["response"]["id"], "resp_1");
        assert_eq!(tail[1]["response"]["status"], "failed");
        assert_eq!(tail[1]["response"]["error"]["code"], "server_error");
        assert!(out.contains("event: response.failed\n"));
        let mut again = Vec::new();
        w.finish(&mut again);
        assert!(again.is_empty());
    }

    #[test]
    fn a_corrupt_responses_event_ends_the_stream_there() {
        let corrupt = format!("{RESPONSES}data: {{not json\n\ndata: {{\"type\":\"x\"}}\n\n");
        let mut w = ResponsesStreamWatch::new();
        let out = run(&mut w, &corrupt);
        assert!(out.starts_with(RESPONSES));
        let tail = events(&out[RESPONSES.len()..]);
        let kinds: Vec<&str> = tail.iter().filter_map(|e| e["type"].as_str()).collect();
        assert_eq!(kinds, ["error", "response.failed"]);
        assert_eq!(tail[0]["code"], "invalid_provider_response");
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

    #[test]
    fn only_whole_events_go_out_and_only_the_one_arriving_waits() {
        let full =
            format!("{ANTHROPIC}: keep-alive\n\nevent: message_stop\ndata: {{\"type\":\"message_stop\"}}\n\n");
        let bytes = full.as_bytes();
        let ends: Vec<usize> = (2..=bytes.len())
            .filter(|&i| &bytes[i - 2..i] == b"\n\n")
            .collect();
        let mut w = AnthropicStreamWatch::new();
        let mut out = Vec::new();
        for (i, byte) in bytes.chunks(1).enumerate() {
            w.push(byte, &mut out);
            let whole = ends.iter().copied().filter(|&e| e <= i + 1).max();
            assert_eq!(out, &bytes[..whole.unwrap_or(0)], "after byte {i}");
        }
        w.finish(&mut out);
        assert_eq!(out, bytes);
    }

    #[test]
    fn a_half_event_at_the_end_is_dropped_for_the_error() {
        let half = "event: content_block_delta\ndata: {\"type\":\"content_bl";
        let mut w = AnthropicStreamWatch::new();
        let out = run(&mut w, &format!("{ANTHROPIC}{half}"));
        let tail = out.strip_prefix(ANTHROPIC).unwrap();
        assert!(tail.starts_with("event: error\ndata: {"), "{tail}");
        assert!(!tail.contains("content_bl"));
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
