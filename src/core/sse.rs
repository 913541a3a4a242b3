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
//!
//! An event that outgrows the limit ends the parse: the parser drops what it
//! held, reports [`SseParser::overflowed`] and reads nothing more, so every
//! reader ends its caller's stream with an error rather than a hole.

/// The most one event may hold (16 MiB) before the stream is given up.
pub const MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;

/// Line buffers grown past this by a large event are freed, not kept for
/// the rest of the stream.
const KEPT_BUFFER_BYTES: usize = 64 * 1024;

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
#[derive(Debug)]
pub struct SseParser {
    /// Bytes of the line being read, terminator not yet seen.
    line: Vec<u8>,
    /// The line being read has at least one byte.
    line_started: bool,
    /// The last chunk ended with `\r`: a `\n` right after it belongs to it.
    skip_lf: bool,
    event: Option<String>,
    data: String,
    has_data: bool,
    /// Bytes of the current, unfinished event taken in so far.
    held: usize,
    /// The most `held` may reach.
    limit: usize,
    /// An event outgrew `limit`: nothing more is read.
    overflowed: bool,
    /// A line has been completed (a byte-order mark can only come first).
    past_first_line: bool,
    /// How many leading bytes of the last chunk belong to ended blocks
    /// (events and comment-only blocks, blank line included).
    settled: usize,
}

impl Default for SseParser {
    fn default() -> Self {
        Self::with_limit(MAX_EVENT_BYTES)
    }
}

impl SseParser {
    /// A parser that gives up on an event larger than `limit` bytes.
    pub fn with_limit(limit: usize) -> Self {
        SseParser {
            line: Vec::new(),
            line_started: false,
            skip_lf: false,
            event: None,
            data: String::new(),
            has_data: false,
            held: 0,
            limit,
            overflowed: false,
            past_first_line: false,
            settled: 0,
        }
    }

    /// Feeds bytes; calls `on_event` for every event completed by them (in order).
    pub fn push(&mut self, chunk: &[u8], on_event: &mut dyn FnMut(SseEvent)) {
        self.push_spans(chunk, &mut |event, _| on_event(event));
    }

    /// Like [`SseParser::push`], and also tells which bytes of `chunk` each
    /// event spans: from the end of the block before it (0 when the event
    /// began in an earlier chunk) to just past its blank line, CRLF
    /// included. So a reader can pass whole events on byte for byte.
    pub fn push_spans(
        &mut self,
        chunk: &[u8],
        on_event: &mut dyn FnMut(SseEvent, std::ops::Range<usize>),
    ) {
        self.settled = 0;
        if self.overflowed {
            return;
        }
        let mut at = 0;
        if let Some(&first) = chunk.first().filter(|_| self.skip_lf) {
            self.skip_lf = false;
            if first == b'\n' {
                at = 1;
                if self.held == 0 {
                    // The LF of the blank line that ended the last block.
                    self.settled = 1;
                }
            }
        }
        while let Some(rest) = chunk.get(at..).filter(|r| !r.is_empty()) {
            let Some(i) = rest.iter().position(|&b| b == b'\n' || b == b'\r') else {
                self.take_text(rest);
                return;
            };
            self.take_text(rest.get(..i).unwrap_or_default());
            if self.overflowed {
                return;
            }
            let mut end = at + i + 1;
            if rest.get(i) == Some(&b'\r') {
                match rest.get(i + 1) {
                    Some(b'\n') => end += 1,
                    Some(_) => {}
                    None => self.skip_lf = true,
                }
            }
            self.held = self.held.saturating_add(1);
            self.end_line(end, on_event);
            at = end;
        }
    }

    /// Bytes held back waiting for the end of an event.
    pub fn pending(&self) -> usize {
        self.held
    }

    /// An event outgrew the limit: it was dropped and the stream cannot be
    /// read any further.
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// How many leading bytes of the last chunk pushed belong to blocks that
    /// have ended; the rest belongs to a block still arriving.
    pub fn settled(&self) -> usize {
        self.settled
    }

    fn take_text(&mut self, text: &[u8]) {
        if text.is_empty() {
            return;
        }
        self.line_started = true;
        let held = self.held.saturating_add(text.len());
        if held > self.limit {
            log::warn!(
                "an upstream server-sent event is larger than {} bytes; the stream is given up",
                self.limit
            );
            self.line = Vec::new();
            self.data = String::new();
            self.event = None;
            self.has_data = false;
            self.held = 0;
            self.overflowed = true;
            return;
        }
        self.held = held;
        self.line.extend_from_slice(text);
    }

    fn end_line(&mut self, end: usize, on_event: &mut dyn FnMut(SseEvent, std::ops::Range<usize>)) {
        let started = std::mem::replace(&mut self.line_started, false);
        let first_line = !std::mem::replace(&mut self.past_first_line, true);
        if !started {
            self.dispatch(end, on_event);
            self.settled = end;
            return;
        }
        let line = std::mem::take(&mut self.line);
        let mut text: &[u8] = &line;
        if first_line {
            text = text.strip_prefix(BOM).unwrap_or(text);
        }
        self.field(text);
        if line.capacity() <= KEPT_BUFFER_BYTES {
            let mut line = line;
            line.clear();
            self.line = line;
        }
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

    fn dispatch(&mut self, end: usize, on_event: &mut dyn FnMut(SseEvent, std::ops::Range<usize>)) {
        self.held = 0;
        let event = self.event.take().filter(|e| !e.is_empty());
        if !std::mem::replace(&mut self.has_data, false) {
            return;
        }
        let data = std::mem::take(&mut self.data);
        // `settled` still marks the end of the block before this one.
        on_event(SseEvent { event, data }, self.settled..end);
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
        // An empty chunk in between changes nothing.
        let (events, _) = parse_pieces(&[b"data: a\r", b"", b"\ndata: b\r\n\r\n"]);
        assert_eq!(events, vec![ev(None, "a\nb")]);
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
    fn an_oversized_event_ends_the_parse() {
        let mut parser = SseParser::default();
        let mut events = Vec::new();
        parser.push(b"data: before\n\nevent: big\ndata: ", &mut |e| {
            events.push(e)
        });
        let block = vec![b'x'; 1024 * 1024];
        for _ in 0..15 {
            parser.push(&block, &mut |e| events.push(e));
        }
        assert!(!parser.overflowed());
        parser.push(&block, &mut |e| events.push(e));
        // Over the cap: the event is gone, nothing is held, and the parser
        // reads nothing more, not even small events after it.
        assert!(parser.overflowed());
        assert_eq!(parser.pending(), 0);
        assert_eq!(parser.line.capacity(), 0);
        parser.push(b"\n\nevent: small\ndata: ok\n\n", &mut |e| events.push(e));
        assert_eq!(events, vec![ev(None, "before")]);
        assert!(parser.overflowed());
        assert_eq!(parser.settled(), 0);
    }

    #[test]
    fn events_before_an_oversized_one_in_the_same_chunk_are_kept() {
        let mut parser = SseParser::with_limit(32);
        let mut events = Vec::new();
        let mut input = b"data: a\n\ndata: ".to_vec();
        input.extend_from_slice(&[b'y'; 40]);
        input.extend_from_slice(b"\n\ndata: c\n\n");
        parser.push(&input, &mut |e| events.push(e));
        assert_eq!(events, vec![ev(None, "a")]);
        assert!(parser.overflowed());
        assert_eq!(parser.settled(), b"data: a\n\n".len());
    }

    #[test]
    fn the_limit_counts_the_whole_event_not_one_line() {
        // 32 bytes: "data: 0123456789\n" twice is 34 with the terminators.
        let mut parser = SseParser::with_limit(32);
        parser.push(b"data: 0123456789\ndata: 0123456789\n\n", &mut |_| {});
        assert!(parser.overflowed());
        let mut parser = SseParser::with_limit(34);
        let mut n = 0;
        parser.push(b"data: 0123456789\ndata: 0123456789\n\n", &mut |_| n += 1);
        assert!(!parser.overflowed());
        assert_eq!(n, 1);
    }

    /// The raw bytes of each event, as `push_spans` cuts them, whatever the
    /// chunking: every byte belongs to exactly one event or block, in order.
    fn spans(pieces: &[&[u8]]) -> (Vec<Vec<u8>>, Vec<u8>) {
        let mut parser = SseParser::default();
        let mut cut = Vec::new();
        let mut tail = Vec::new();
        for piece in pieces {
            let mut sent = 0;
            parser.push_spans(piece, &mut |_, span| {
                let end = span.end;
                tail.extend_from_slice(&piece[sent..end]);
                cut.push(std::mem::take(&mut tail));
                sent = end;
            });
            let settled = parser.settled().max(sent);
            tail.extend_from_slice(&piece[sent..settled]);
            if settled > sent {
                cut.push(std::mem::take(&mut tail));
            }
            tail.extend_from_slice(&piece[settled..]);
        }
        (cut, tail)
    }

    #[test]
    fn spans_cut_the_raw_stream_at_event_ends_whatever_the_chunking() {
        let input: &[u8] =
            b"event: a\r\ndata: 1\r\n\r\n: ping\r\n\r\ndata: 2\r\rdata: 3\n\ndata: half";
        let (whole, tail) = spans(&[input]);
        assert_eq!(
            whole,
            vec![
                b"event: a\r\ndata: 1\r\n\r\n".to_vec(),
                // A comment block goes out with the event after it.
                b": ping\r\n\r\ndata: 2\r\r".to_vec(),
                b"data: 3\n\n".to_vec(),
            ]
        );
        assert_eq!(tail, b"data: half");
        for at in 0..=input.len() {
            let (a, b) = input.split_at(at);
            let (cut, tail) = spans(&[a, b]);
            let joined: Vec<u8> = cut.concat();
            assert_eq!(joined, whole.concat(), "split at {at}");
            assert_eq!(tail, b"data: half", "split at {at}");
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        let (cut, tail) = spans(&bytes);
        assert_eq!(cut.concat(), whole.concat());
        assert_eq!(tail, b"data: half");
    }

    #[test]
    fn a_crlf_blank_line_split_after_its_cr_settles_its_lf_at_once() {
        let mut parser = SseParser::default();
        let mut spans = Vec::new();
        parser.push_spans(b"data: 1\r\n\r", &mut |_, span| spans.push(span));
        assert_eq!(spans, vec![0..10]);
        assert_eq!(parser.settled(), 10);
        // The LF completing that blank line belongs to the ended event: the
        // next event's span starts after it.
        parser.push_spans(b"\ndata: 2\n\n", &mut |_, span| spans.push(span));
        assert_eq!(spans, vec![0..10, 1..10]);
        assert_eq!(parser.settled(), 10);
        // An LF completing a data line does not.
        let mut parser = SseParser::default();
        parser.push_spans(b"data: 1\r", &mut |_, _| {});
        parser.push_spans(b"\n", &mut |_, _| {});
        assert_eq!(parser.settled(), 0);
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
