//! The one stream plumbing every translating stream shares: the upstream
//! body cut into events ([`Framing`]: SSE, AWS event-stream), events that
//! arrive split across chunks, events the gateway cannot read or hold, the
//! end of the body, and nothing written after the stream ended. A
//! translator implements only its per-event mapping ([`EventMapping`]) and
//! is run by [`EventStream`].
//!
//! The contract it keeps (see `translate`): a stream that completed ends
//! with its schema's end; a stream that broke (a [`StreamFault`], or a body
//! that ended early) ends with one error event in the output schema and
//! nothing after it.

use crate::core::api_error::ApiError;
use crate::core::sse::{SseEvent, SseParser};
use crate::core::usage::Usage;
use crate::providers::aws::eventstream::{Decoder, Message};
use crate::translate::{StreamFault, StreamTranslator, MAX_PIVOT_EVENT_BYTES};

/// How an upstream body is cut into events.
pub trait Framing {
    type Event;
    /// Appends every event `chunk` completes (the rest waits for the next
    /// chunk). An error: the body cannot be read past the events appended.
    fn push(&mut self, chunk: &[u8], events: &mut Vec<Self::Event>) -> Result<(), StreamFault>;
}

/// Server-sent events, each at most the parser's limit.
impl Framing for SseParser {
    type Event = SseEvent;
    fn push(&mut self, chunk: &[u8], events: &mut Vec<SseEvent>) -> Result<(), StreamFault> {
        SseParser::push(self, chunk, &mut |e| events.push(e));
        if self.overflowed() {
            return Err(StreamFault::Oversized);
        }
        Ok(())
    }
}

/// AWS `application/vnd.amazon.eventstream` messages (Bedrock).
impl Framing for Decoder {
    type Event = Message;
    fn push(&mut self, chunk: &[u8], events: &mut Vec<Message>) -> Result<(), StreamFault> {
        self.push_into(chunk, events).map_err(|e| {
            log::warn!("corrupt AWS event stream: {e}");
            StreamFault::Corrupt
        })
    }
}

/// Whether the stream goes on after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Open,
    /// The mapping wrote the stream's end (or an error event): nothing more
    /// goes out.
    Ended,
}

/// One translator's per-event logic.
pub trait EventMapping {
    type Event;
    /// The upstream's name in logs and error messages ("Anthropic", or
    /// "provider's" for the pivot a caller-side translator reads).
    const UPSTREAM: &'static str;
    /// Writes the translation of one event. An error ends the stream with
    /// the fault's error event.
    fn on_event(&mut self, event: Self::Event, out: &mut Vec<u8>) -> Result<Flow, StreamFault>;
    /// The body ended with the stream open. A schema without an end marker
    /// writes its end here and says `Ended` when the answer is complete;
    /// `Open` gets the "ended before completion" error event.
    fn on_end(&mut self, _out: &mut Vec<u8>) -> Flow {
        Flow::Open
    }
    /// Appends the output schema's error event for `error`.
    fn write_error(&mut self, error: &ApiError, out: &mut Vec<u8>);
    /// Token counts seen so far, if any.
    fn usage(&self) -> Option<Usage>;
}

/// The error a stream that ended early ends with; `upstream` as in
/// [`EventMapping::UPSTREAM`].
pub fn interrupted(upstream: &str) -> ApiError {
    ApiError::new(
        502,
        "server_error",
        Some("stream_interrupted"),
        format!("The {upstream} stream ended before completion; the answer is incomplete."),
    )
}

/// A translating stream: `F` cuts the body into events, `M` maps them.
pub struct EventStream<F: Framing, M> {
    framing: F,
    mapping: M,
    /// The events of the chunk being read (kept for its capacity).
    events: Vec<F::Event>,
    open: bool,
}

impl<F: Framing, M: EventMapping<Event = F::Event>> EventStream<F, M> {
    pub fn reading(framing: F, mapping: M) -> Self {
        EventStream {
            framing,
            mapping,
            events: Vec::new(),
            open: true,
        }
    }

    /// The same stream cut by `framing` instead.
    pub fn with_framing(mut self, framing: F) -> Self {
        self.framing = framing;
        self
    }

    pub fn mapping(&self) -> &M {
        &self.mapping
    }

    fn fault(mapping: &mut M, fault: StreamFault, out: &mut Vec<u8>) {
        log::warn!("ending a {} stream early: {fault:?} event", M::UPSTREAM);
        mapping.write_error(&fault.error(M::UPSTREAM), out);
    }
}

impl<F: Framing + Default, M: EventMapping<Event = F::Event> + Default> Default
    for EventStream<F, M>
{
    fn default() -> Self {
        EventStream::reading(F::default(), M::default())
    }
}

impl<M: EventMapping<Event = SseEvent>> EventStream<SseParser, M> {
    /// Reads the gateway's own pivot (behind a provider-side translator),
    /// whose events may be a little larger than a provider's.
    pub fn reading_pivot(self) -> Self {
        self.with_framing(SseParser::with_limit(MAX_PIVOT_EVENT_BYTES))
    }
}

impl<F: Framing, M: EventMapping<Event = F::Event>> StreamTranslator for EventStream<F, M> {
    fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        if !self.open {
            return;
        }
        let Self {
            framing,
            mapping,
            events,
            open,
        } = self;
        let framed = framing.push(chunk, events);
        for event in events.drain(..) {
            match mapping.on_event(event, out) {
                Ok(Flow::Open) => {}
                Ok(Flow::Ended) => *open = false,
                Err(fault) => {
                    Self::fault(mapping, fault, out);
                    *open = false;
                }
            }
            if !*open {
                break;
            }
        }
        if let (Err(fault), true) = (framed, *open) {
            Self::fault(mapping, fault, out);
            *open = false;
        }
    }

    fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.open {
            return;
        }
        self.open = false;
        if self.mapping.on_end(out) == Flow::Open {
            self.mapping.write_error(&interrupted(M::UPSTREAM), out);
        }
    }

    fn usage(&self) -> Option<Usage> {
        self.mapping.usage()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::chat_output::write_data;

    /// Echoes `data` until an event says "end".
    #[derive(Default)]
    struct Echo {
        events: usize,
    }

    impl EventMapping for Echo {
        type Event = SseEvent;
        const UPSTREAM: &'static str = "Echo";
        fn on_event(&mut self, event: SseEvent, out: &mut Vec<u8>) -> Result<Flow, StreamFault> {
            self.events += 1;
            match event.data.as_str() {
                "bad" => Err(StreamFault::Corrupt),
                "end" => Ok(Flow::Ended),
                data => {
                    write_data(out, data.as_bytes());
                    Ok(Flow::Open)
                }
            }
        }
        fn write_error(&mut self, error: &ApiError, out: &mut Vec<u8>) {
            write_data(out, error.message.as_bytes());
        }
        fn usage(&self) -> Option<Usage> {
            None
        }
    }

    fn run(chunks: &[&[u8]], finish: bool) -> (String, usize) {
        let mut stream = EventStream::reading(SseParser::default(), Echo::default());
        let mut out = Vec::new();
        for chunk in chunks {
            stream.push(chunk, &mut out);
        }
        if finish {
            stream.finish(&mut out);
        }
        (String::from_utf8(out).unwrap(), stream.mapping().events)
    }

    #[test]
    fn events_split_across_chunks_are_mapped_whole() {
        let (out, events) = run(&[b"data: a", b"b\n\ndata: c\n", b"\ndata: end\n\n"], true);
        assert_eq!(out, "data: ab\n\ndata: c\n\n");
        assert_eq!(events, 3);
    }

    #[test]
    fn a_fault_ends_the_stream_with_one_error_and_nothing_after() {
        let (out, events) = run(
            &[b"data: a\n\ndata: bad\n\ndata: c\n\n", b"data: d\n\n"],
            true,
        );
        assert_eq!(
            out,
            "data: a\n\ndata: The Echo stream sent an event the gateway could not read; \
             the answer is incomplete.\n\n"
        );
        assert_eq!(events, 2);
    }

    #[test]
    fn an_early_end_is_an_error_and_a_giant_event_a_fault() {
        let (out, _) = run(&[b"data: a\n\n"], true);
        assert_eq!(
            out,
            "data: a\n\ndata: The Echo stream ended before completion; the answer is \
             incomplete.\n\n"
        );
        let mut stream = EventStream::reading(SseParser::with_limit(8), Echo::default());
        let mut out = Vec::new();
        stream.push(b"data: 0123456789", &mut out);
        stream.finish(&mut out);
        let out = String::from_utf8(out).unwrap();
        assert!(
            out.starts_with("data: The Echo stream sent an event larger than"),
            "{out}"
        );
        assert_eq!(out.matches("data: ").count(), 1, "{out}");
    }
}
