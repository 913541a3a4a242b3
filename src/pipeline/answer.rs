//! The answer as it passes, and what both halves do to it: its status
//! read, an error reply rewritten in the caller's shape, an answer held
//! past the size limit replaced (the respond stage decides when).

use super::flow::Flow;
use crate::config::providers::Provider;
use crate::config::Config;
use crate::core::api_error::{self, ApiError};
use crate::core::schema::Schema;
use crate::host::Host;
use crate::pipeline::handoff::{
    ATTEMPTS_RESPONSE_HEADER, MODEL_RESPONSE_HEADER, PROVIDER_RESPONSE_HEADER,
    ROUTE_RESPONSE_HEADER,
};
use crate::translate::exchange::{self, ErrorReply, Exchange};
use crate::translate::StreamTranslator;

/// The size to read a body buffer whole with, whatever a rewrite made of
/// it (hosts return at most what there is).
pub(super) const WHOLE_BUFFER: usize = i32::MAX as usize;

/// What the response side does with the answer.
pub(super) enum ResponseMode {
    /// Forward untouched (streams chunk by chunk).
    PassThrough,
    /// Buffer an error reply and rewrite it into the caller's shape.
    Error {
        status: u16,
        via_upstream: bool,
        error_type: Option<String>,
    },
    /// Buffer a complete answer and translate it (the listener half holds
    /// the headers meanwhile; the upstream half lets them pass, so Envoy
    /// sees the answer started and never retries it elsewhere).
    Translate,
    /// Listener half with a chain: hold a complete answer until its end,
    /// so the upstream half can still change its status
    /// (`handoff::answer_status`).
    Hold,
    /// Translate a stream event by event.
    Stream(Box<dyn StreamTranslator>),
    /// Forward a complete answer untouched, keeping a copy to read its usage.
    Watch(Vec<u8>),
}

impl ResponseMode {
    /// The answer's bytes reach the caller as they pass.
    pub(super) fn passes(&self) -> bool {
        matches!(
            self,
            ResponseMode::PassThrough | ResponseMode::Stream(_) | ResponseMode::Watch(_)
        )
    }
}

/// What a response stage asks of the half that owns it.
pub(super) enum Step {
    Go(Flow),
    /// Replace the answer, whose headers are still held, with this status
    /// and body (see `Router::replace_answer`).
    Replace(u16, Vec<u8>),
}

/// The answer as it passes: its status (the caller's) and what is done
/// with its body.
pub(super) struct Answer {
    pub status: u16,
    pub mode: ResponseMode,
}

impl Default for Answer {
    fn default() -> Self {
        Answer {
            status: 0,
            mode: ResponseMode::PassThrough,
        }
    }
}

/// The target an answer comes from, as the response stages read it.
pub(super) struct Serving<'a> {
    pub config: &'a Config,
    pub caller: Schema,
    /// The provider (an index into `Config::providers`) that answers.
    pub provider: Option<usize>,
    pub exchange: Option<&'a Exchange>,
}

impl Serving<'_> {
    fn provider(&self) -> Option<&Provider> {
        self.config.providers.get(self.provider?)
    }
}

impl Answer {
    pub(super) fn read_status(&mut self, host: &dyn Host) {
        self.status = host
            .response_header(":status")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
    }

    /// An error reply's headers: its status becomes the caller's, and its
    /// body is held to be rewritten in the caller's shape. `upstream`: the
    /// upstream half lets a bodiless one pass, which Envoy may still retry.
    pub(super) fn error_headers(
        &mut self,
        host: &mut dyn Host,
        end_of_stream: bool,
        serving: &Serving,
        upstream: bool,
    ) -> Step {
        // `via_upstream` means the provider answered; any other detail
        // means Envoy did (connect failure, timeout, overflow, ...).
        let via_upstream = matches!(
            host.response_code_details().as_deref(),
            Some("via_upstream") | None
        );
        let error_type = host.response_header("x-amzn-errortype");
        let caller_status = reply_status(match (serving.exchange, via_upstream) {
            (Some(x), true) => exchange::caller_status(x, self.status, error_type.as_deref()),
            _ => self.status,
        });
        let mode = ResponseMode::Error {
            status: self.status,
            via_upstream,
            error_type,
        };
        if caller_status != self.status {
            let _ = host.set_response_header(":status", &caller_status.to_string());
        }
        self.status = caller_status;
        if end_of_stream && upstream {
            // Envoy may still retry it; the listener half answers it if
            // it is the last (see `answer_bodiless_error`).
            return Step::Go(Flow::Continue);
        }
        if end_of_stream {
            // No body to rewrite: a whole answer in the caller's shape
            // takes the reply's place.
            let body = error_reply_body(serving, &mode, b"");
            return Step::Replace(caller_status, bodiless(serving.caller, caller_status, body));
        }
        self.mode = mode;
        // The body is replaced once complete; its length will change.
        rewrites_body(host, "application/json");
        // Held with the body, so a reply cut short or too large can
        // still be answered in the caller's shape.
        Step::Go(Flow::Pause)
    }

    /// An error reply's body, held whole and rewritten in the caller's
    /// shape.
    pub(super) fn error_body(
        &mut self,
        host: &mut dyn Host,
        body_size: usize,
        end_of_stream: bool,
        serving: &Serving,
    ) -> Step {
        if body_size > serving.config.max_response_bytes {
            return self.too_large(serving);
        }
        if !end_of_stream {
            return Step::Go(Flow::Pause);
        }
        let mode = std::mem::replace(&mut self.mode, ResponseMode::PassThrough);
        let body = match host.response_body(body_size) {
            Ok(b) => b,
            Err(e) => {
                log::warn!("could not read a response body: {e}");
                return Step::Go(Flow::Continue);
            }
        };
        if let Some(new_body) = error_reply_body(serving, &mode, &body) {
            if let Err(e) = host.replace_response_body(body_size, &new_body) {
                log::warn!("could not rewrite a response body: {e}");
            }
        }
        Step::Go(Flow::Continue)
    }

    /// The answer held past the limit: an error in the caller's shape
    /// replaces it (502 for an answer, the reply's status for an error).
    pub(super) fn too_large(&mut self, serving: &Serving) -> Step {
        let limit = serving.config.max_response_bytes;
        let provider = serving.provider().map_or("none", |p| p.name.as_str());
        let error = match self.mode {
            ResponseMode::Error { status, .. } => ApiError::new(
                self.status,
                api_error::error_type_for_status(self.status),
                None,
                format!(
                    "Provider {provider:?} answered with HTTP {status} and an error body larger \
                     than this gateway's limit of {limit} bytes (max_response_bytes)."
                ),
            ),
            _ => ApiError::new(
                502,
                "server_error",
                Some("response_too_large"),
                format!(
                    "Provider {provider:?} sent an answer larger than this gateway's limit of \
                     {limit} bytes (max_response_bytes); a translated answer is held whole."
                ),
            ),
        };
        log::warn!("{}", error.message);
        self.mode = ResponseMode::PassThrough;
        let body = exchange::error_body(serving.caller, &error);
        Step::Replace(error.status, body)
    }

    /// What the caller needs of held headers when the answer is replaced;
    /// the upstream half names its attempt itself (`with_attempts` false).
    pub(super) fn kept_headers(
        &self,
        host: &dyn Host,
        with_attempts: bool,
    ) -> Vec<(String, String)> {
        const KEPT: &[&str] = &[
            "retry-after",
            "x-should-retry",
            PROVIDER_RESPONSE_HEADER,
            MODEL_RESPONSE_HEADER,
            ROUTE_RESPONSE_HEADER,
            ATTEMPTS_RESPONSE_HEADER,
        ];
        KEPT.iter()
            .filter(|name| with_attempts || **name != ATTEMPTS_RESPONSE_HEADER)
            .filter_map(|name| Some((name.to_string(), host.response_header(name)?)))
            .collect()
    }
}

/// An error reply's body in the caller's shape (None: pass it as it is).
fn error_reply_body(serving: &Serving, mode: &ResponseMode, body: &[u8]) -> Option<Vec<u8>> {
    let ResponseMode::Error {
        status,
        via_upstream,
        error_type,
    } = mode
    else {
        return None;
    };
    let provider = serving.provider();
    let secrets: Vec<&str> = provider.map(Provider::secrets).unwrap_or_default();
    let reply = ErrorReply {
        status: *status,
        body,
        error_type: error_type.as_deref(),
        via_upstream: *via_upstream,
        provider: provider.map(|p| p.name.as_str()),
        secrets: &secrets,
    };
    exchange::translate_error(serving.caller, serving.exchange, &reply)
}

/// The status the caller gets for an error reply: its own, unless it is
/// outside HTTP's error classes (an HTTP/1 upstream may send any three
/// digits), which is a bad gateway.
pub(super) fn reply_status(status: u16) -> u16 {
    if (400..=599).contains(&status) {
        status
    } else {
        502
    }
}

/// An empty reply's rewrite; were there none, a plain one of the caller's
/// shape says what happened.
pub(super) fn bodiless(caller: Schema, status: u16, body: Option<Vec<u8>>) -> Vec<u8> {
    body.unwrap_or_else(|| {
        let error = ApiError::new(
            status,
            api_error::error_type_for_status(status),
            None,
            format!("The provider answered HTTP {status} with no details."),
        );
        exchange::error_body(caller, &error)
    })
}

/// The body will be replaced: its length and encoding will change.
pub(super) fn rewrites_body(host: &mut dyn Host, content_type: &str) {
    let _ = host.remove_response_header("content-length");
    let _ = host.remove_response_header("content-encoding");
    let _ = host.set_response_header("content-type", content_type);
}
