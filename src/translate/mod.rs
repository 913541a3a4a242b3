//! Translation between the API schemas callers speak and the native APIs of
//! providers.
//!
//! OpenAI Chat Completions is the pivot: every other schema has one module
//! per direction to or from it, so N inbound APIs and M provider APIs need
//! N + M translators, not N × M. A caller and a provider that speak the same
//! schema skip translation entirely (only `model` is rewritten).
//!
//! | module            | caller speaks      | provider speaks                          |
//! |-------------------|--------------------|------------------------------------------|
//! | `openai_anthropic`| OpenAI             | Anthropic Messages (also on Vertex AI)   |
//! | `openai_gemini`   | OpenAI             | Gemini `generateContent` (also Vertex AI)|
//! | `openai_bedrock`  | OpenAI             | AWS Bedrock Converse                     |
//! | `openai_usage`    | OpenAI             | OpenAI (usage read from streams)         |
//! | `passthrough`     | Anthropic, Gemini  | the same schema (streams watched)        |
//! | `anthropic_openai`| Anthropic Messages | OpenAI (the pivot)                       |
//! | `gemini_openai`   | Gemini `generateContent` | OpenAI (the pivot)           |
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

pub mod anthropic_openai;
pub mod chat_input;
pub mod gemini_openai;
pub mod openai_anthropic;
pub mod openai_bedrock;
pub mod openai_gemini;
pub mod openai_usage;
pub mod passthrough;

/// The API schemas the gateway speaks, on either side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Schema {
    /// OpenAI Chat Completions (also Azure OpenAI and OpenAI-compatibles).
    OpenAi,
    /// Anthropic Messages (also on Vertex AI).
    Anthropic,
    /// Google Gemini generateContent (also on Vertex AI).
    Gemini,
    /// AWS Bedrock Converse.
    Converse,
}

/// Token counts of one exchange, in OpenAI's terms: `input_tokens` counts
/// every prompt token, cached ones (read or written) included;
/// `cached_input_tokens` those read from a cache; `reasoning_tokens` the part
/// of `output_tokens` spent thinking, where the provider reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_input_tokens: u64,
    pub reasoning_tokens: u64,
}

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
