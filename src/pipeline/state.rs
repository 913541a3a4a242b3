//! The state one request carries through the listener half's stages, and
//! the small types every stage shares.

use crate::access::namespace_policy::Applied;
use crate::config::models::Operation;
use crate::core::schema::Schema;
use crate::host::Host;
use crate::quota::admission::{Admission, Who};

/// How far a request (or an upstream attempt) got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Nothing decided yet.
    Start,
    /// Buffering the request body of an LLM call.
    ReadingBody,
    /// Waiting for a call to another service (the shared quota store: see `admit.rs`).
    Deferred,
    /// Sent to a provider.
    Forwarded,
    /// Answered by the filter itself.
    Answered,
    /// Not for a host the filter handles: passed through untouched.
    Bypass,
}

/// What the listener half's stages know of the request: each stage reads
/// what those before it wrote.
pub(super) struct RequestState {
    /// The API the caller speaks; errors go back in its shape.
    pub caller: Schema,
    /// None for listings and unknown URLs, which are not LLM calls.
    pub operation: Option<Operation>,
    /// Gemini callers name the model and streaming in the URL.
    pub gemini_call: Option<(String, bool)>,
    /// The caller asked for a streamed answer.
    pub streaming: bool,
    /// The answer's status as the caller sees it.
    pub status: u16,
    /// When the request started, in µs.
    pub started_us: u64,
    /// When the answer's first byte passed, in µs.
    pub first_byte_us: Option<u64>,
    /// Answer bytes passed to the caller.
    pub response_bytes: u64,
    /// Who called.
    pub who: Who,
    /// The namespace policy in force (mesh, document namespace entry or
    /// listener metadata).
    pub applied: Applied,
    /// What the request reserved.
    pub admission: Option<Admission>,
    /// Headers for the caller's answer (rate limits, budget alerts,
    /// downgrades) and for a refusal.
    pub answer_headers: Vec<(String, String)>,
    /// `admitted`, `rejected:<limit>:<reason>` or `none`.
    pub quota_decision: String,
    /// The model the caller asked for, as a metric label (a name the
    /// config does not know is `_OTHER`).
    pub request_model: Option<String>,
    /// Why the first target was chosen.
    pub reason: Option<String>,
    /// The target the request is named by in metrics: the first the
    /// routing chose (or the configured first, before a decision).
    pub route: Option<usize>,
    /// The caller's own fallbacks (`x-meshllm-models`), taken off the
    /// request at the entrance with every other internal header.
    pub extra_models: Option<String>,
    /// The request's header names as listed at the entrance, reused where
    /// client headers are removed later.
    pub entry_headers: Option<Vec<String>>,
    /// The request was counted and settled.
    pub finished: bool,
}

impl Default for RequestState {
    fn default() -> Self {
        RequestState {
            caller: Schema::OpenAi,
            operation: None,
            gemini_call: None,
            streaming: false,
            status: 0,
            started_us: 0,
            first_byte_us: None,
            response_bytes: 0,
            who: Who::default(),
            applied: Applied::default(),
            admission: None,
            answer_headers: Vec::new(),
            quota_decision: "none".into(),
            request_model: None,
            reason: None,
            route: None,
            extra_models: None,
            entry_headers: None,
            finished: false,
        }
    }
}

impl RequestState {
    /// The client's request headers: the entrance's listing when there was
    /// one (the filter adds no header it later looks for, and removing a
    /// name removed since is a no-op), else a fresh one.
    pub fn client_headers(&mut self, host: &dyn Host) -> RequestHeaders {
        match self.entry_headers.take() {
            Some(names) => RequestHeaders(Some(names)),
            None => RequestHeaders::list(host),
        }
    }
}

/// Which of many request headers are present, from one listing of the map
/// instead of a host call per name. The listing may name headers removed
/// since (removing one again is a harmless no-op); when it failed, each
/// name is asked for on its own.
pub(super) struct RequestHeaders(pub Option<Vec<String>>);

impl RequestHeaders {
    pub fn list(host: &dyn Host) -> Self {
        RequestHeaders(host.request_header_names().ok())
    }

    pub fn has(&self, host: &dyn Host, name: &str) -> bool {
        match &self.0 {
            Some(names) => names.iter().any(|n| n.eq_ignore_ascii_case(name)),
            None => host.request_header(name).is_some(),
        }
    }
}

/// The model and streaming choice read from a call's body (or URL).
#[derive(Clone)]
pub(super) struct Call {
    pub model: String,
    pub model_span: Option<std::ops::Range<usize>>,
    pub stream: bool,
}
