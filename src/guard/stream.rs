//! Answer guardrails on a stream, as it flows, in the caller's own API.
//!
//! The text deltas of a stream (OpenAI chat chunks, Anthropic text deltas,
//! Gemini parts, Responses `output_text` deltas) are read as one running
//! text. The last `window` bytes of it are held back, with their events, so
//! a secret or a denied phrase split across events (and chunks) is seen
//! whole before any of it goes out: a redacting rule then rewrites the
//! held events in place (the mask in the event where the match began, the
//! rest of the match taken out of the events after it), a blocking rule
//! ends the stream there with the API's error event. What was sent before
//! is never taken back; nothing of the match is ever sent. Events without
//! a delta (a Responses `output_text.done`, a final summary) are screened
//! whole as they go out.

use std::cell::RefCell;
use std::ops::Range;
use std::rc::Rc;

use serde_json::Value;

use crate::core::api_error::ApiError;
use crate::core::schema::Schema;
use crate::core::sse::{SseEvent, SseParser};
use crate::core::usage::Usage;
use crate::guard::detect::{redact, Finding};
use crate::guard::json_text::{rewrite, text_values};
use crate::guard::policy::{Action, Check, GuardRule};
use crate::guard::screen::Decision;
use crate::translate::passthrough::{
    AnthropicStreamEnd, GeminiStreamEnd, ResponsesStreamEnd, StreamEnd,
};
use crate::translate::StreamTranslator;

/// Decisions a stream's guard made, read by the pipeline as they come.
pub type DecisionSink = Rc<RefCell<Vec<Decision>>>;

/// Left context kept from text already sent, so detectors that look at
/// what precedes a match (word boundaries, `Bearer `) still see it.
const CONTEXT_BYTES: usize = 64;

/// One event held back.
struct Held {
    event: SseEvent,
    /// Where its delta lies in the held text, if it has one.
    text: Option<Range<usize>>,
}

/// A stream's answer guardrails: a `StreamTranslator` over the caller's
/// own events.
pub struct StreamGuard {
    caller: Schema,
    all: Rc<Vec<GuardRule>>,
    /// The matching rules on answers, in order.
    rules: Vec<usize>,
    window: usize,
    parser: SseParser,
    held: Vec<Held>,
    /// The held deltas' text.
    text: String,
    /// The tail of the text already sent.
    context: String,
    /// Rules that fired already (each is reported once per stream).
    fired: Vec<usize>,
    sink: DecisionSink,
    ended: bool,
    /// A Responses stream's state, for its `error` + `response.failed` end.
    responses: ResponsesStreamEnd,
}

/// A finding of one rule in the held text.
struct Hit {
    rule: usize,
    action: Action,
    finding: Finding,
}

impl StreamGuard {
    /// None when none of `rules` (indices into `all`) reads answer text.
    pub fn new(
        caller: Schema,
        all: &Rc<Vec<GuardRule>>,
        rules: &[usize],
        sink: DecisionSink,
    ) -> Option<Self> {
        let rules: Vec<usize> = rules
            .iter()
            .copied()
            .filter(|&i| {
                all.get(i)
                    .is_some_and(|r| r.on_response && matches!(r.check, Check::Match(_)))
            })
            .collect();
        let window = rules
            .iter()
            .filter_map(|&i| match &all.get(i)?.check {
                Check::Match(m) => Some(m.window()),
                _ => None,
            })
            .max()?;
        Some(StreamGuard {
            caller,
            all: Rc::clone(all),
            rules,
            window,
            parser: SseParser::default(),
            held: Vec::new(),
            text: String::new(),
            context: String::new(),
            fired: Vec::new(),
            sink,
            ended: false,
            responses: ResponsesStreamEnd::default(),
        })
    }

    fn matcher(&self, rule: usize) -> Option<(&crate::guard::detect::Matcher, Action)> {
        let r = self.all.get(rule)?;
        match &r.check {
            Check::Match(m) => Some((m, r.action)),
            _ => None,
        }
    }

    fn fire(&mut self, rule: usize, action: Action, what: &str) {
        if self.fired.contains(&rule) {
            return;
        }
        self.fired.push(rule);
        self.sink.borrow_mut().push(Decision {
            rule,
            action,
            found: vec![what.to_string()],
        });
    }

    /// Every rule's findings in the held text (with the sent context before
    /// it; a finding that starts inside the context went out already, whole
    /// or not, and is not the held text's).
    fn hits(&self) -> Vec<Hit> {
        let scanned = format!("{}{}", self.context, self.text);
        let offset = self.context.len();
        let mut out = Vec::new();
        for &rule in &self.rules {
            let Some((m, action)) = self.matcher(rule) else {
                continue;
            };
            for f in m.find_all(&scanned) {
                if f.start < offset {
                    continue;
                }
                out.push(Hit {
                    rule,
                    action,
                    finding: Finding {
                        start: f.start - offset,
                        end: f.end - offset,
                        what: f.what,
                    },
                });
            }
        }
        out
    }

    /// Releases what is safe: everything when `all`, else the events
    /// before the last `window` bytes of text (and before any match that
    /// reaches into them).
    fn release(&mut self, all: bool, out: &mut Vec<u8>) {
        let hits = self.hits();
        if let Some(block) = hits.iter().find(|h| h.action == Action::Block) {
            let (rule, what) = (block.rule, block.finding.what);
            self.fire(rule, Action::Block, what);
            self.block(rule, out);
            return;
        }
        let mut safe = if all {
            self.text.len()
        } else {
            floor_boundary(&self.text, self.text.len().saturating_sub(self.window))
        };
        for h in &hits {
            if h.finding.start < safe && h.finding.end > safe {
                safe = h.finding.start;
            }
        }
        // Redactions and flags among what goes out.
        let mut cuts: Vec<&Hit> = hits
            .iter()
            .filter(|h| h.finding.end <= safe && h.action == Action::Redact)
            .collect();
        let fired: Vec<(usize, Action, &'static str)> = hits
            .iter()
            .filter(|h| h.finding.end <= safe)
            .map(|h| (h.rule, h.action, h.finding.what))
            .collect();
        for (rule, action, what) in fired {
            self.fire(rule, action, what);
        }
        cuts.sort_by_key(|h| (h.finding.start, std::cmp::Reverse(h.finding.end)));
        let mut merged: Vec<(Range<usize>, &'static str)> = Vec::new();
        for h in cuts {
            let r = h.finding.start..h.finding.end;
            match merged.last_mut() {
                Some((last, _)) if r.start < last.end => last.end = last.end.max(r.end),
                _ => merged.push((r, h.finding.what)),
            }
        }
        // Events whose text ends by `safe` go, in order; the first that
        // does not stops the rest.
        let mut released = 0;
        for held in &self.held {
            match &held.text {
                Some(r) if r.end > safe => break,
                _ => released += 1,
            }
        }
        let going: Vec<Held> = self.held.drain(..released).collect();
        let mut sent_to = 0;
        for held in going {
            match held.text {
                Some(r) => {
                    let new = masked(&self.text, &r, &merged);
                    sent_to = r.end;
                    self.emit_delta(held.event, new, out);
                }
                None => self.emit_whole(held.event, out),
            }
            if self.ended {
                return;
            }
        }
        // The sent text leaves the held text, its tail kept as context.
        let sent = self.text.get(..sent_to).unwrap_or_default().to_string();
        self.text = self.text.get(sent_to..).unwrap_or_default().to_string();
        for held in &mut self.held {
            if let Some(r) = &mut held.text {
                *r = r.start - sent_to..r.end - sent_to;
            }
        }
        self.context.push_str(&sent);
        let keep = floor_boundary(
            &self.context,
            self.context.len().saturating_sub(CONTEXT_BYTES),
        );
        self.context = self.context.get(keep..).unwrap_or_default().to_string();
    }

    /// A delta event with its (possibly masked) text.
    fn emit_delta(&mut self, mut event: SseEvent, text: String, out: &mut Vec<u8>) {
        if let Ok(mut v) = serde_json::from_str::<Value>(&event.data) {
            if delta_text(self.caller, &v) != Some(text.as_str()) {
                if let Some(slot) = delta_slot(self.caller, &mut v) {
                    *slot = Value::String(text);
                    event.data = v.to_string();
                }
            }
        }
        self.write(event, out);
    }

    /// An event without a delta, screened whole (a summary repeats the
    /// text: it is masked as the deltas were, or blocks).
    fn emit_whole(&mut self, mut event: SseEvent, out: &mut Vec<u8>) {
        let values = text_values(event.data.as_bytes());
        let mut edits = Vec::new();
        for v in &values {
            let mut text = v.text.clone();
            let mut changed = false;
            for rule in self.rules.clone() {
                let Some((m, action)) = self.matcher(rule) else {
                    continue;
                };
                let findings = m.find_all(&text);
                let Some(first) = findings.first() else {
                    continue;
                };
                let what = first.what;
                self.fire(rule, action, what);
                match action {
                    Action::Block => {
                        self.block(rule, out);
                        return;
                    }
                    Action::Redact => {
                        text = redact(&text, &findings);
                        changed = true;
                    }
                    Action::Flag => {}
                }
            }
            if changed {
                edits.push((v.span.clone(), text));
            }
        }
        if !edits.is_empty() {
            let new = rewrite(event.data.as_bytes(), &edits);
            event.data = String::from_utf8_lossy(&new).into_owned();
        }
        self.write(event, out);
    }

    fn write(&mut self, event: SseEvent, out: &mut Vec<u8>) {
        if self.caller == Schema::Responses {
            self.responses.on_event(event.clone());
        }
        if let Some(name) = &event.event {
            out.extend_from_slice(b"event: ");
            out.extend_from_slice(name.as_bytes());
            out.push(b'\n');
        }
        for line in event.data.split('\n') {
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(line.as_bytes());
            out.push(b'\n');
        }
        out.push(b'\n');
    }

    /// Ends the stream with the caller's error event; what is held is
    /// dropped.
    fn block(&mut self, rule: usize, out: &mut Vec<u8>) {
        self.ended = true;
        self.held.clear();
        self.text.clear();
        let name = self.all.get(rule).map_or("", |r| r.name.as_str());
        let error = ApiError::new(
            400,
            "invalid_request_error",
            Some("content_policy_violation"),
            format!("The rest of the answer was withheld by the gateway's guardrail `{name}`."),
        );
        // The same error events the stream watchers end broken streams with.
        match self.caller {
            Schema::Responses => self.responses.fail(&error, out),
            Schema::Anthropic => AnthropicStreamEnd::default().fail(&error, out),
            Schema::Gemini => GeminiStreamEnd::default().fail(&error, out),
            Schema::OpenAi | Schema::Converse => {
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(&error.body());
                out.extend_from_slice(b"\n\n");
            }
        }
    }
}

impl StreamTranslator for StreamGuard {
    fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        if self.ended {
            return;
        }
        let mut events = Vec::new();
        self.parser.push(chunk, &mut |e| events.push(e));
        for event in events {
            let text = serde_json::from_str::<Value>(&event.data)
                .ok()
                .and_then(|v| delta_text(self.caller, &v).map(str::to_string));
            let range = text.map(|t| {
                let start = self.text.len();
                self.text.push_str(&t);
                start..self.text.len()
            });
            self.held.push(Held { event, text: range });
        }
        self.release(false, out);
    }

    fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.ended {
            self.release(true, out);
        }
    }

    fn usage(&self) -> Option<Usage> {
        None
    }
}

/// The largest char boundary of `s` at or before `at`.
fn floor_boundary(s: &str, at: usize) -> usize {
    let mut at = at.min(s.len());
    while at > 0 && !s.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// The text of `range` with the merged matches masked: a match's mask in
/// the event where it begins, the rest of it taken out.
fn masked(text: &str, range: &Range<usize>, matches: &[(Range<usize>, &'static str)]) -> String {
    let mut out = String::new();
    let mut at = range.start;
    for (m, what) in matches {
        if m.end <= range.start || m.start >= range.end {
            continue;
        }
        let cut_from = m.start.max(range.start);
        out.push_str(text.get(at..cut_from).unwrap_or_default());
        if m.start >= range.start {
            out.push_str(&format!("[REDACTED:{what}]"));
        }
        at = m.end.min(range.end);
    }
    out.push_str(text.get(at..range.end).unwrap_or_default());
    out
}

/// The delta text an event carries in `caller`'s API, if it is a delta.
fn delta_text(caller: Schema, v: &Value) -> Option<&str> {
    match caller {
        Schema::OpenAi => {
            let choices = v.get("choices")?.as_array()?;
            if choices.len() != 1 {
                return None;
            }
            choices.first()?.pointer("/delta/content")?.as_str()
        }
        Schema::Anthropic => {
            (v.get("type")?.as_str()? == "content_block_delta"
                && v.pointer("/delta/type")?.as_str()? == "text_delta")
                .then_some(())?;
            v.pointer("/delta/text")?.as_str()
        }
        Schema::Gemini => {
            let parts = v.pointer("/candidates/0/content/parts")?.as_array()?;
            match parts.as_slice() {
                [only] if only.get("thought").is_none() => only.get("text")?.as_str(),
                _ => None,
            }
        }
        Schema::Responses => {
            (v.get("type")?.as_str()? == "response.output_text.delta").then_some(())?;
            v.get("delta")?.as_str()
        }
        Schema::Converse => None,
    }
}

/// Where `delta_text` reads, for writing.
fn delta_slot(caller: Schema, v: &mut Value) -> Option<&mut Value> {
    match caller {
        Schema::OpenAi => v.pointer_mut("/choices/0/delta/content"),
        Schema::Anthropic => v.pointer_mut("/delta/text"),
        Schema::Gemini => v.pointer_mut("/candidates/0/content/parts/0/text"),
        Schema::Responses => v.get_mut("delta"),
        Schema::Converse => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guard::policy::compile_guardrails;
    use serde_json::json;

    fn guard(caller: Schema, rules: Value) -> (StreamGuard, DecisionSink) {
        let g = compile_guardrails(Some(&json!({ "rules": rules }))).unwrap();
        let n: Vec<usize> = (0..g.rules.len()).collect();
        let sink = DecisionSink::default();
        let all = Rc::new(g.rules);
        (
            StreamGuard::new(caller, &all, &n, Rc::clone(&sink)).unwrap(),
            sink,
        )
    }

    fn openai_chunk(text: &str) -> String {
        format!(
            "data: {}\n\n",
            json!({"choices": [{"index": 0, "delta": {"content": text}}]})
        )
    }

    fn openai_text(out: &[u8]) -> (String, Vec<Value>) {
        let mut text = String::new();
        let mut events = Vec::new();
        for block in String::from_utf8_lossy(out).split("\n\n") {
            let Some(data) = block.strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(data).unwrap();
            if let Some(t) = v
                .pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
            {
                text.push_str(t);
            }
            events.push(v);
        }
        (text, events)
    }

    /// Feeds `pieces` one by one (each may hold part of a secret), returns
    /// what went out after each push and at the end.
    fn run(g: &mut StreamGuard, pieces: &[&str]) -> (Vec<Vec<u8>>, Vec<u8>) {
        let mut outs = Vec::new();
        for p in pieces {
            let mut out = Vec::new();
            g.push(openai_chunk(p).as_bytes(), &mut out);
            outs.push(out);
        }
        let mut end = Vec::new();
        g.push(b"data: [DONE]\n\n", &mut end);
        g.finish(&mut end);
        (outs, end)
    }

    #[test]
    fn a_secret_split_across_events_is_masked_and_never_sent_in_part() {
        let (mut g, sink) = guard(
            Schema::OpenAi,
            json!([
            {"name": "secrets", "secrets": true, "action": "redact"}]),
        );
        let pieces = [
            "Your key: sk-pr",
            "oj-Ab3dEf6hIj9k",
            "Lm2nOp5qRs8tUv and more",
            " text.",
        ];
        let (outs, end) = run(&mut g, &pieces);
        let all: Vec<u8> = outs.iter().flatten().chain(end.iter()).copied().collect();
        let (text, _) = openai_text(&all);
        assert_eq!(text, "Your key: [REDACTED:secret] and more text.");
        for (i, out) in outs.iter().enumerate() {
            let s = String::from_utf8_lossy(out);
            assert!(
                !s.contains("sk-pr") && !s.contains("Ab3dEf"),
                "push {i}: {s}"
            );
        }
        assert!(String::from_utf8_lossy(&all).ends_with("data: [DONE]\n\n"));
        assert_eq!(sink.borrow().len(), 1);
        assert_eq!(sink.borrow()[0].action, Action::Redact);
    }

    #[test]
    fn a_denied_phrase_split_across_events_ends_the_stream_with_an_error() {
        let (mut g, sink) = guard(
            Schema::OpenAi,
            json!([
            {"name": "deny", "keywords": ["project falcon"], "action": "block"}]),
        );
        let (outs, end) = run(
            &mut g,
            &["The plan is pro", "ject fal", "con, launching", " soon"],
        );
        let all: Vec<u8> = outs.iter().flatten().chain(end.iter()).copied().collect();
        let s = String::from_utf8_lossy(&all);
        assert!(!s.contains("falcon") && !s.contains("ject fal"), "{s}");
        let (text, events) = openai_text(&all);
        assert!(
            "The plan is ".starts_with(&text),
            "only text before the phrase went: {text}"
        );
        let last = events.last().unwrap();
        assert_eq!(last["error"]["code"], "content_policy_violation");
        assert!(
            !s.contains("[DONE]"),
            "a blocked stream does not end cleanly"
        );
        assert_eq!(sink.borrow()[0].action, Action::Block);
    }

    #[test]
    fn clean_text_passes_whole_and_flags_are_reported_once() {
        let (mut g, sink) = guard(
            Schema::OpenAi,
            json!([
            {"name": "watch", "keywords": ["falcon"], "action": "flag"}]),
        );
        let (outs, end) = run(&mut g, &["a falcon", " and another falcon", "."]);
        let all: Vec<u8> = outs.iter().flatten().chain(end.iter()).copied().collect();
        let (text, _) = openai_text(&all);
        assert_eq!(text, "a falcon and another falcon.");
        assert_eq!(sink.borrow().len(), 1);
    }

    #[test]
    fn each_api_has_its_deltas_read_and_masked() {
        let rules = json!([{"name": "pii", "pii": ["email"], "action": "redact"}]);
        let cases = [
            (Schema::Anthropic, "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"TEXT\"}}\n\n"),
            (Schema::Gemini, "data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"TEXT\"}],\"role\":\"model\"}}]}\n\n"),
            (Schema::Responses, "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"sequence_number\":1,\"delta\":\"TEXT\"}\n\n"),
        ];
        for (api, template) in cases {
            let (mut g, _) = guard(api, rules.clone());
            let mut out = Vec::new();
            for piece in ["mail bob@exa", "mple.com now"] {
                g.push(template.replace("TEXT", piece).as_bytes(), &mut out);
            }
            g.finish(&mut out);
            let s = String::from_utf8_lossy(&out);
            assert!(s.contains("[REDACTED:email]"), "{api:?}: {s}");
            assert!(!s.contains("bob@"), "{api:?}: {s}");
        }
    }

    #[test]
    fn a_summary_event_is_masked_like_its_deltas() {
        let (mut g, _) = guard(
            Schema::Responses,
            json!([
            {"name": "pii", "pii": ["email"], "action": "redact"}]),
        );
        let mut out = Vec::new();
        let done = "event: response.output_text.done\ndata: {\"type\":\"response.output_text.done\",\"sequence_number\":5,\"text\":\"mail bob@example.com\"}\n\n";
        g.push(done.as_bytes(), &mut out);
        g.finish(&mut out);
        let s = String::from_utf8_lossy(&out);
        assert!(
            s.contains("mail [REDACTED:email]") && !s.contains("bob@"),
            "{s}"
        );
    }
}
