//! Hostile provider streams against every caller × provider pair, through
//! the translator (or watcher) the filter builds for it
//! (`exchange::stream_translator`). The inputs are the corpus in
//! `tests/fixtures/hostile/streams/` (see its README), which the Envoy tests
//! (`tests/test_stream_faults.py`) replay too.

use serde_json::Value;

use crate::core::json::from_str_lossy;
use crate::core::schema::Schema;
use crate::core::sse::{SseEvent, SseParser, MAX_EVENT_BYTES};
use crate::providers::aws::eventstream::encode;
use crate::translate::exchange::{stream_translator, Exchange};

/// The key every provider has in these tests; the corpus quotes it.
const KEY: &str = "hostile-key/0123456789abcdef";
const KEY_ESCAPED: &str = "hostile-key\\/0123456789abcdef";

const CALLERS: [Schema; 3] = [Schema::OpenAi, Schema::Anthropic, Schema::Gemini];
const PROVIDERS: [Schema; 4] = [
    Schema::OpenAi,
    Schema::Anthropic,
    Schema::Gemini,
    Schema::Converse,
];

macro_rules! corpus {
    ($name:literal) => {
        include_bytes!(concat!("../../tests/fixtures/hostile/streams/", $name)).as_slice()
    };
}

/// The corpus file `kind` in `provider`'s wire format.
fn corpus(provider: Schema, kind: &str) -> &'static [u8] {
    match (provider, kind) {
        (Schema::OpenAi, "corrupt") => corpus!("openai_corrupt.sse"),
        (Schema::OpenAi, "error_secret") => corpus!("openai_error_secret.sse"),
        (Schema::OpenAi, "lone_surrogate") => corpus!("openai_lone_surrogate.sse"),
        (Schema::OpenAi, "giant") => corpus!("openai_giant.sse"),
        (Schema::Anthropic, "corrupt") => corpus!("anthropic_corrupt.sse"),
        (Schema::Anthropic, "error_secret") => corpus!("anthropic_error_secret.sse"),
        (Schema::Anthropic, "lone_surrogate") => corpus!("anthropic_lone_surrogate.sse"),
        (Schema::Anthropic, "giant") => corpus!("anthropic_giant.sse"),
        (Schema::Gemini, "corrupt") => corpus!("gemini_corrupt.sse"),
        (Schema::Gemini, "error_secret") => corpus!("gemini_error_secret.sse"),
        (Schema::Gemini, "lone_surrogate") => corpus!("gemini_lone_surrogate.sse"),
        (Schema::Gemini, "giant") => corpus!("gemini_giant.sse"),
        (Schema::Converse, "corrupt") => corpus!("bedrock_corrupt.bin"),
        (Schema::Converse, "bad_frame") => corpus!("bedrock_bad_frame.bin"),
        (Schema::Converse, "error_secret") => corpus!("bedrock_error_secret.bin"),
        (Schema::Converse, "lone_surrogate") => corpus!("bedrock_lone_surrogate.bin"),
        other => panic!("no corpus file for {other:?}"),
    }
}

fn exchange(caller: Schema, provider: Schema) -> Exchange {
    Exchange {
        caller,
        provider,
        stream: true,
        // OpenAI callers ask for usage: OpenAI streams then pass unchanged.
        caller_wants_usage: caller == Schema::OpenAi,
        upstream_model: "model".into(),
    }
}

/// What the caller receives when the provider's body arrives in `pieces`.
fn run(caller: Schema, provider: Schema, pieces: &[&[u8]]) -> Vec<u8> {
    let mut t = stream_translator(&exchange(caller, provider), 1_700_000_000, &[KEY]).unwrap();
    let mut out = Vec::new();
    for piece in pieces {
        t.push(piece, &mut out);
    }
    t.finish(&mut out);
    out
}

fn events(out: &[u8]) -> Vec<SseEvent> {
    let mut parser = SseParser::with_limit(usize::MAX);
    let mut events = Vec::new();
    parser.push(out, &mut |e| events.push(e));
    events
}

fn json(event: &SseEvent) -> Option<Value> {
    from_str_lossy(&event.data).ok()
}

/// The answer's text as the caller's SDK would assemble it.
fn text(caller: Schema, out: &[u8]) -> String {
    let mut text = String::new();
    for v in events(out).iter().filter_map(json) {
        let pieces: Vec<&Value> = match caller {
            Schema::Anthropic => v.pointer("/delta/text").into_iter().collect(),
            Schema::Gemini => v
                .pointer("/candidates/0/content/parts")
                .and_then(Value::as_array)
                .map(|parts| parts.iter().filter_map(|p| p.get("text")).collect())
                .unwrap_or_default(),
            _ => v.pointer("/choices/0/delta/content").into_iter().collect(),
        };
        text.extend(pieces.into_iter().filter_map(Value::as_str));
    }
    text
}

/// The stream ends the way the caller's API ends a complete answer, and
/// carries no error.
fn assert_clean_end(caller: Schema, out: &[u8], what: &str) {
    let events = events(out);
    let last = events.last().unwrap_or_else(|| panic!("{what}: no events"));
    let errors = events.iter().filter(|e| is_error(caller, e)).count();
    assert_eq!(errors, 0, "{what}: {}", String::from_utf8_lossy(out));
    match caller {
        Schema::Anthropic => assert_eq!(last.event.as_deref(), Some("message_stop"), "{what}"),
        Schema::Gemini => {
            let v = json(last).unwrap();
            assert!(
                v.pointer("/candidates/0/finishReason").is_some(),
                "{what}: {v}"
            );
        }
        _ => assert_eq!(last.data, "[DONE]", "{what}"),
    }
}

fn is_error(caller: Schema, event: &SseEvent) -> bool {
    match caller {
        Schema::Anthropic => event.event.as_deref() == Some("error"),
        _ => json(event).is_some_and(|v| v.get("error").is_some_and(Value::is_object)),
    }
}

/// The stream ends with exactly one error event in the caller's shape,
/// after everything else, and nothing marks the answer complete. Returns
/// the error object.
fn assert_error_end(caller: Schema, out: &[u8], what: &str) -> Value {
    let events = events(out);
    let shown = String::from_utf8_lossy(out);
    let last = events.last().unwrap_or_else(|| panic!("{what}: no events"));
    assert!(
        is_error(caller, last),
        "{what}: last event is no error: {shown}"
    );
    let errors = events.iter().filter(|e| is_error(caller, e)).count();
    assert_eq!(errors, 1, "{what}: {shown}");
    let v = json(last).unwrap();
    match caller {
        Schema::Anthropic => {
            assert!(!events
                .iter()
                .any(|e| e.event.as_deref() == Some("message_stop")));
            assert_eq!(v["type"], "error", "{what}");
            assert!(v.pointer("/error/type").is_some_and(Value::is_string));
        }
        Schema::Gemini => {
            let finished = events
                .iter()
                .filter_map(json)
                .any(|v| v.pointer("/candidates/0/finishReason").is_some());
            assert!(!finished, "{what}: a finishReason went out: {shown}");
            assert!(
                v.pointer("/error/code").is_some_and(Value::is_u64),
                "{what}"
            );
            assert!(v.pointer("/error/status").is_some_and(Value::is_string));
        }
        _ => {
            assert!(
                !events.iter().any(|e| e.data == "[DONE]"),
                "{what}: {shown}"
            );
            assert!(v.pointer("/error/type").is_some_and(Value::is_string));
        }
    }
    v["error"].clone()
}

/// The error says what went wrong in the caller's terms: a 502 with the
/// gateway's `code` (Gemini: its status and the reason in `details`).
fn assert_fault(caller: Schema, error: &Value, code: &str, what: &str) {
    match caller {
        Schema::Anthropic => assert_eq!(error["type"], "api_error", "{what}"),
        Schema::Gemini => {
            assert_eq!(error["code"], 502, "{what}");
            assert_eq!(error["status"], "UNAVAILABLE", "{what}");
            assert_eq!(
                error["details"][0]["reason"],
                code.to_ascii_uppercase(),
                "{what}"
            );
        }
        _ => {
            assert_eq!(error["type"], "server_error", "{what}");
            assert_eq!(error["code"], code, "{what}");
        }
    }
}

fn every_pair() -> impl Iterator<Item = (Schema, Schema)> {
    CALLERS
        .into_iter()
        .flat_map(|c| PROVIDERS.into_iter().map(move |p| (c, p)))
}

#[test]
fn a_corrupt_event_ends_every_pair_with_an_error_and_nothing_after() {
    for (caller, provider) in every_pair() {
        let kinds: &[&str] = if provider == Schema::Converse {
            &["corrupt", "bad_frame"]
        } else {
            &["corrupt"]
        };
        for kind in kinds {
            let input = corpus(provider, kind);
            let what = format!("{caller:?} caller, {provider:?} provider, {kind}");
            let out = run(caller, provider, &[input]);
            let error = assert_error_end(caller, &out, &what);
            assert_fault(caller, &error, "invalid_provider_response", &what);
            let message = error["message"].as_str().unwrap();
            assert!(message.contains("could not read"), "{what}: {message}");
            assert!(message.contains("incomplete"), "{what}: {message}");
            assert_eq!(text(caller, &out), "Before the fault.", "{what}");
            let shown = String::from_utf8_lossy(&out);
            assert!(!shown.contains("lost wo"), "{what}");
            assert!(!shown.contains("After the fault"), "{what}");
            // The same whatever the chunking.
            for at in 0..=input.len() {
                let (a, b) = input.split_at(at);
                assert_eq!(run(caller, provider, &[a, b]), out, "{what}, split at {at}");
            }
        }
    }
}

#[test]
fn a_provider_key_in_a_streamed_error_never_reaches_any_caller() {
    for (caller, provider) in every_pair() {
        let input = corpus(provider, "error_secret");
        let what = format!("{caller:?} caller, {provider:?} provider");
        let whole = run(caller, provider, &[input]);
        let error = assert_error_end(caller, &whole, &what);
        assert!(
            error["message"].as_str().unwrap().contains("[redacted]"),
            "{what}: {error}"
        );
        assert_eq!(text(caller, &whole), "Before the error.", "{what}");
        // Split at every byte: the key may arrive in two halves.
        for at in 0..=input.len() {
            let (a, b) = input.split_at(at);
            let out = run(caller, provider, &[a, b]);
            let shown = String::from_utf8_lossy(&out);
            assert!(!shown.contains(KEY), "{what}, split at {at}: {shown}");
            assert!(
                !shown.contains(KEY_ESCAPED),
                "{what}, split at {at}: {shown}"
            );
            assert!(!shown.contains("0123456789abcdef"), "{what}, split at {at}");
            assert_eq!(out, whole, "{what}, split at {at}");
        }
    }
}

#[test]
fn half_a_key_is_never_sent_ahead_of_the_rest() {
    // Byte by byte: whatever went out after each byte holds no prefix of
    // the key long enough to matter (the whole event waits).
    for (caller, provider) in every_pair() {
        let input = corpus(provider, "error_secret");
        let mut t = stream_translator(&exchange(caller, provider), 1, &[KEY]).unwrap();
        let mut out = Vec::new();
        for byte in input.chunks(1) {
            t.push(byte, &mut out);
            let shown = String::from_utf8_lossy(&out);
            assert!(
                !shown.contains("hostile-key"),
                "{caller:?}/{provider:?}: {shown}"
            );
        }
        t.finish(&mut out);
        assert!(String::from_utf8_lossy(&out).contains("[redacted]"));
    }
}

#[test]
fn a_lone_surrogate_is_a_valid_event_for_every_pair() {
    for (caller, provider) in every_pair() {
        let input = corpus(provider, "lone_surrogate");
        let what = format!("{caller:?} caller, {provider:?} provider");
        let out = run(caller, provider, &[input]);
        assert_clean_end(caller, &out, &what);
        if caller == provider {
            // Passed on byte for byte, the escape included.
            assert_eq!(out, input, "{what}");
        } else {
            // Translated: the lone half becomes U+FFFD.
            assert_eq!(text(caller, &out), "Hello end \u{fffd}x", "{what}");
        }
        let bytes: Vec<&[u8]> = input.chunks(7).collect();
        assert_eq!(
            run(caller, provider, &bytes),
            out,
            "{what}, in 7-byte chunks"
        );
    }
}

/// The provider's giant-event stream with `fill` bytes of text in the
/// middle event.
fn giant(provider: Schema, fill: usize) -> Vec<u8> {
    let filler = "x".repeat(fill);
    if provider == Schema::Converse {
        let event = |kind: &str, payload: String| {
            encode(
                &[(":event-type", kind), (":message-type", "event")],
                payload.as_bytes(),
            )
        };
        let delta = |text: &str| {
            event(
                "contentBlockDelta",
                format!(r#"{{"contentBlockIndex":0,"delta":{{"text":"{text}"}}}}"#),
            )
        };
        return [
            event("messageStart", r#"{"role":"assistant"}"#.into()),
            delta("Before the giant."),
            delta(&filler),
            delta(" After the giant."),
            event("messageStop", r#"{"stopReason":"end_turn"}"#.into()),
            event(
                "metadata",
                r#"{"usage":{"inputTokens":5,"outputTokens":4}}"#.into(),
            ),
        ]
        .concat();
    }
    let template = std::str::from_utf8(corpus(provider, "giant")).unwrap();
    template.replacen("@@FILL@@", &filler, 1).into_bytes()
}

/// An event over 16 MiB ends the stream of every caller with an error
/// (nothing of it, nothing after it); one of 15 MiB passes whole.
fn giant_events_from(provider: Schema) {
    const MIB: usize = 1024 * 1024;
    let small = giant(provider, 15 * MIB);
    let large = giant(provider, 17 * MIB);
    assert!(large.len() > MAX_EVENT_BYTES);
    for caller in CALLERS {
        let what = format!("{caller:?} caller, {provider:?} provider");
        // As a network would deliver it: 1 MiB at a time.
        let out = run(caller, provider, &small.chunks(MIB).collect::<Vec<_>>());
        assert_clean_end(caller, &out, &what);
        let answer = text(caller, &out);
        assert!(answer.starts_with("Before the giant.xxx"), "{what}");
        assert!(answer.ends_with("xxx After the giant."), "{what}");
        assert_eq!(answer.len(), 15 * MIB + 34, "{what}");

        let out = run(caller, provider, &large.chunks(MIB).collect::<Vec<_>>());
        let error = assert_error_end(caller, &out, &what);
        let message = error["message"].as_str().unwrap();
        // Bedrock's own framing caps its frames: a corrupt length.
        let (code, expected) = if provider == Schema::Converse {
            ("invalid_provider_response", "could not read")
        } else {
            ("provider_event_too_large", "larger than 16 MiB")
        };
        assert_fault(caller, &error, code, &what);
        assert!(message.contains(expected), "{what}: {message}");
        assert_eq!(text(caller, &out), "Before the giant.", "{what}");
        assert!(out.len() < MIB, "{what}: the giant went out");
    }
}

// One test per provider schema, so they run side by side.
#[test]
fn giant_events_from_openai_providers() {
    giant_events_from(Schema::OpenAi);
}

#[test]
fn giant_events_from_anthropic_providers() {
    giant_events_from(Schema::Anthropic);
}

#[test]
fn giant_events_from_gemini_providers() {
    giant_events_from(Schema::Gemini);
}

#[test]
fn giant_events_from_bedrock_providers() {
    giant_events_from(Schema::Converse);
}
