//! Incremental Server-Sent Events (`text/event-stream`) parser.
//!
//! Upstream bodies arrive in chunks cut at arbitrary bytes: inside a line,
//! between the two bytes of a CRLF, inside a multi-byte UTF-8 character. The
//! parser keeps raw bytes until a line is complete, so nothing is decoded
//! half-way, and hands out every event as soon as the blank line ending it
//! has arrived. It follows the WHATWG parsing rules the gateway needs: `\n`,
//! `\r\n` and lone `\r` end lines; lines starting with `:` are comments;
//! `data:` lines (one leading space removed) are joined with `\n`; `event:`
//! names the event; `id:`, `retry:` and unknown fields are ignored; an event
//! without data lines is not dispatched; an event left unfinished when the
//! stream ends is never dispatched.

/// The most one event may hold before it is dropped.
pub const MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field; `None` when absent or empty (the default "message").
    pub event: Option<String>,
    /// The `data:` lines, joined with `\n`.
    pub data: String,
}

/// Feeds on chunks of a stream and calls back once per complete event.
#[derive(Debug, Default)]
pub struct SseParser {
    /// Bytes of the line being read, terminator not yet seen.
    line: Vec<u8>,
    /// The line being read has at least one byte (also while discarding).
    line_started: bool,
    /// The last line ended with `\r`: a `\n` right after it belongs to it.
    skip_lf: bool,
    event: Option<String>,
    data: String,
    has_data: bool,
    /// Bytes of the current, unfinished event taken in so far.
    held: usize,
    /// The current event outgrew the cap: skip to its end.
    discarding: bool,
    /// A line has been completed (a byte-order mark can only come first).
    past_first_line: bool,
}

impl SseParser {
    /// Feeds bytes; calls `on_event` for every event completed by them (in order).
    pub fn push(&mut self, chunk: &[u8], on_event: &mut dyn FnMut(SseEvent)) {
        let mut rest = chunk;
        while let Some((&first, tail)) = rest.split_first() {
            if self.skip_lf {
                self.skip_lf = false;
                if first == b'\n' {
                    rest = tail;
                    continue;
                }
            }
            match rest.iter().position(|&b| b == b'\n' || b == b'\r') {
                None => {
                    self.take_text(rest);
                    break;
                }
                Some(at) => {
                    let (text, terminated) = rest.split_at(at);
                    self.take_text(text);
                    let Some((&terminator, after)) = terminated.split_first() else {
                        break;
                    };
                    self.skip_lf = terminator == b'\r';
                    if !self.discarding {
                        self.held = self.held.saturating_add(1);
                    }
                    self.end_line(on_event);
                    rest = after;
                }
            }
        }
    }

    /// Bytes held back waiting for the end of an event.
    pub fn pending(&self) -> usize {
        self.held
    }

    fn take_text(&mut self, text: &[u8]) {
        if text.is_empty() {
            return;
        }
        self.line_started = true;
        if self.discarding {
            return;
        }
        let held = self.held.saturating_add(text.len());
        if held > MAX_EVENT_BYTES {
            log::warn!(
                "dropping a server-sent event larger than {MAX_EVENT_BYTES} bytes from the upstream stream"
            );
            self.line.clear();
            self.data.clear();
            self.event = None;
            self.has_data = false;
            self.held = 0;
            self.discarding = true;
            return;
        }
        self.held = held;
        self.line.extend_from_slice(text);
    }

    fn end_line(&mut self, on_event: &mut dyn FnMut(SseEvent)) {
        let started = std::mem::replace(&mut self.line_started, false);
        let first_line = !std::mem::replace(&mut self.past_first_line, true);
        if self.discarding {
            if !started {
                // The blank line ending the oversized event.
                self.discarding = false;
                self.held = 0;
            }
            return;
        }
        if !started {
            self.dispatch(on_event);
            return;
        }
        let line = std::mem::take(&mut self.line);
        let mut text: &[u8] = &line;
        if first_line {
            text = text.strip_prefix(BOM).unwrap_or(text);
        }
        self.field(text);
        let mut line = line;
        line.clear();
        self.line = line;
    }

    fn field(&mut self, line: &[u8]) {
        if line.is_empty() || line.first() == Some(&b':') {
            return;
        }
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(at) => {
                let (name, value) = line.split_at(at);
                let value = value.get(1..).unwrap_or_default();
                (name, value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &[][..]),
        };
        match name {
            b"data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(&String::from_utf8_lossy(value));
                self.has_data = true;
            }
            b"event" => self.event = Some(String::from_utf8_lossy(value).into_owned()),
            _ => {}
        }
    }

    fn dispatch(&mut self, on_event: &mut dyn FnMut(SseEvent)) {
        self.held = 0;
        let event = self.event.take().filter(|e| !e.is_empty());
        if !std::mem::replace(&mut self.has_data, false) {
            return;
        }
        let data = std::mem::take(&mut self.data);
        on_event(SseEvent { event, data });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(event: Option<&str>, data: &str) -> SseEvent {
        SseEvent {
            event: event.map(str::to_string),
            data: data.to_string(),
        }
    }

    fn parse_pieces(pieces: &[&[u8]]) -> (Vec<SseEvent>, usize) {
        let mut parser = SseParser::default();
        let mut events = Vec::new();
        for piece in pieces {
            parser.push(piece, &mut |e| events.push(e));
        }
        (events, parser.pending())
    }

    fn parse_all(input: &[u8]) -> Vec<SseEvent> {
        parse_pieces(&[input]).0
    }

    /// Every way of feeding `input` gives the same events.
    fn assert_split_invariant(input: &[u8], expected: &[SseEvent]) {
        assert_eq!(parse_all(input), expected, "all at once");
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(parse_pieces(&bytes).0, expected, "byte by byte");
        for at in 0..=input.len() {
            let (a, b) = input.split_at(at);
            assert_eq!(parse_pieces(&[a, b]).0, expected, "split at {at}");
        }
    }

    #[test]
    fn grammar_table() {
        let table: &[(&str, &[u8], Vec<SseEvent>)] = &[
            (
                "event and data",
                b"event: ping\ndata: {}\n\n",
                vec![ev(Some("ping"), "{}")],
            ),
            (
                "no space after colon",
                b"event:a\ndata:x\n\n",
                vec![ev(Some("a"), "x")],
            ),
            (
                "only one leading space removed",
                b"data:  two\n\n",
                vec![ev(None, " two")],
            ),
            (
                "multiple data lines joined with newline",
                b"data: a\ndata: b\ndata:\ndata: c\n\n",
                vec![ev(None, "a\nb\n\nc")],
            ),
            (
                "comment lines are ignored",
                b": keep-alive\n\n:another\ndata: x\n: inside\n\n",
                vec![ev(None, "x")],
            ),
            (
                "event without data is not dispatched and its name does not leak",
                b"event: lonely\n\ndata: y\n\n",
                vec![ev(None, "y")],
            ),
            (
                "id, retry and unknown fields are ignored",
                b"id: 7\nretry: 1000\nfoo: bar\ndata: z\n\n",
                vec![ev(None, "z")],
            ),
            ("field without colon", b"data\n\n", vec![ev(None, "")]),
            (
                "empty event name is the default",
                b"event:\ndata: q\n\n",
                vec![ev(None, "q")],
            ),
            (
                "crlf line endings",
                b"event: a\r\ndata: 1\r\n\r\nevent: b\r\ndata: 2\r\n\r\n",
                vec![ev(Some("a"), "1"), ev(Some("b"), "2")],
            ),
            (
                "lone cr line endings",
                b"event: a\rdata: 1\r\rdata: 2\r\r",
                vec![ev(Some("a"), "1"), ev(None, "2")],
            ),
            (
                "mixed endings",
                b"data: 1\r\n\ndata: 2\n\r",
                vec![ev(None, "1"), ev(None, "2")],
            ),
            (
                "several events in one push, colon in value",
                b"data: {\"a\":1}\n\ndata: {\"b\":2}\n\ndata: http://x\n\n",
                vec![
                    ev(None, "{\"a\":1}"),
                    ev(None, "{\"b\":2}"),
                    ev(None, "http://x"),
                ],
            ),
            (
                "utf-8 kept intact",
                "data: café ☕ 👋\n\n".as_bytes(),
                vec![ev(None, "café ☕ 👋")],
            ),
            (
                "leading byte-order mark",
                b"\xEF\xBB\xBFdata: bom\n\n",
                vec![ev(None, "bom")],
            ),
            (
                "unfinished event is not dispatched",
                b"data: done\n\ndata: half",
                vec![ev(None, "done")],
            ),
            (
                "data line finished but no blank line yet",
                b"data: waiting\n",
                vec![],
            ),
        ];
        for (name, input, expected) in table {
            assert_eq!(&parse_all(input), expected, "{name}");
            // The same holds whatever the chunking.
            let bytes: Vec<&[u8]> = input.chunks(1).collect();
            assert_eq!(&parse_pieces(&bytes).0, expected, "{name}, byte by byte");
        }
    }

    #[test]
    fn splits_anywhere_give_the_same_events() {
        let input = "event: message_start\r\ndata: {\"t\":\"héllo 👋\"}\r\n\r\n: ping\r\n\r\nevent: x\rdata: a\rdata: b\r\rdata: last\n\n";
        let expected = vec![
            ev(Some("message_start"), "{\"t\":\"héllo 👋\"}"),
            ev(Some("x"), "a\nb"),
            ev(None, "last"),
        ];
        assert_split_invariant(input.as_bytes(), &expected);
    }

    #[test]
    fn crlf_split_between_cr_and_lf_is_one_line_ending() {
        // If the LF after a chunk-final CR counted as a second line ending,
        // the event would be dispatched early and the second data line lost.
        let (events, pending) = parse_pieces(&[b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"]);
        assert_eq!(events, vec![ev(None, "a\nb")]);
        assert_eq!(pending, 0);
    }

    #[test]
    fn multibyte_character_split_across_pushes() {
        let text = "data: 👋\n\n".as_bytes();
        // The emoji's four bytes start at offset 6.
        for at in 6..=10 {
            let (a, b) = text.split_at(at);
            assert_eq!(parse_pieces(&[a, b]).0, vec![ev(None, "👋")], "at {at}");
        }
    }

    #[test]
    fn events_are_delivered_as_soon_as_they_complete() {
        let mut parser = SseParser::default();
        let mut events = Vec::new();
        parser.push(b"data: 1\n", &mut |e| events.push(e));
        assert!(events.is_empty());
        assert_eq!(parser.pending(), 8);
        parser.push(b"\ndata: 2", &mut |e| events.push(e));
        assert_eq!(events, vec![ev(None, "1")]);
        assert_eq!(parser.pending(), 7);
        parser.push(b"\n\n", &mut |e| events.push(e));
        assert_eq!(events.len(), 2);
        assert_eq!(parser.pending(), 0);
    }

    #[test]
    fn pending_counts_held_bytes_and_resets_after_comments() {
        let (_, pending) = parse_pieces(&[b": comment\n\n"]);
        assert_eq!(pending, 0);
        let (_, pending) = parse_pieces(&[b"event: x\ndata: abc"]);
        assert_eq!(pending, "event: x\ndata: abc".len());
    }

    #[test]
    fn oversized_event_is_dropped_and_the_next_one_survives() {
        let mut parser = SseParser::default();
        let mut events = Vec::new();
        parser.push(b"event: big\ndata: ", &mut |e| events.push(e));
        let block = vec![b'x'; 1024 * 1024];
        for _ in 0..16 {
            parser.push(&block, &mut |e| events.push(e));
        }
        // Over the cap: the event is gone and nothing more is held.
        assert_eq!(parser.pending(), 0);
        parser.push(&block, &mut |e| events.push(e));
        parser.push(b"\ndata: more of it\n", &mut |e| events.push(e));
        assert_eq!(parser.pending(), 0);
        parser.push(b"\nevent: small\ndata: ok\n\n", &mut |e| events.push(e));
        assert_eq!(events, vec![ev(Some("small"), "ok")]);
        assert_eq!(parser.pending(), 0);
    }

    #[test]
    fn event_just_under_the_cap_is_kept() {
        let mut parser = SseParser::default();
        let mut events = Vec::new();
        let payload = vec![b'y'; MAX_EVENT_BYTES - 16];
        parser.push(b"data: ", &mut |e| events.push(e));
        parser.push(&payload, &mut |e| events.push(e));
        parser.push(b"\n\n", &mut |e| events.push(e));
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].data.len(), payload.len());
    }
}
