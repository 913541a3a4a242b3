//! The listener half: endpoint → identify → route → admit → forward, then
//! `finish` once the answer is complete. It hands Envoy a chain of
//! targets (each try served by an upstream [`Attempt`]) or runs its one
//! attempt inline.

use std::rc::Rc;

use super::admit::Admit;
use super::attempt::Attempt;
use super::endpoint::{self, ReadsBody};
use super::finish::keep_caller_path;
use super::respond::Answer;
use super::route::{self, Routed};
use super::state::{Phase, RequestState};
use super::{internal, Flow, Half};
use crate::config::Config;
use crate::core::api_error::ApiError;
use crate::core::json::TopLevel;
use crate::host::{CalloutAnswer, CalloutId, Host};
use crate::pipeline::handoff::Plan;
use crate::translate::exchange;

/// Where the forward stage sent the request.
// One per request, set once: a boxed chain would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub(super) enum Forward {
    /// Not (yet): answered by the filter, or still deciding.
    Not,
    /// Handed to Envoy as a chain; upstream attempts serve it.
    Chain(Chain),
    /// Served by this half's own attempt at its only target.
    Inline(Box<Attempt>),
}

/// A chain handed to Envoy, and what its answer said of it.
pub(super) struct Chain {
    pub plan: Plan,
    /// The provider and model that answered, as reported.
    pub served: Option<(String, String)>,
    /// How many attempts the answer took, as reported.
    pub attempts: u32,
}

/// A request waiting in the admit stage for a call's answer.
struct Deferred {
    id: CalloutId,
    body: Vec<u8>,
    routed: Routed,
    /// The targets that may serve if the answer admits.
    chain: Vec<usize>,
}

pub struct Router {
    pub(super) config: Rc<Config>,
    /// Failover on: several targets go to Envoy as a chain.
    pub(super) chains: bool,
    pub(super) phase: Phase,
    pub(super) req: RequestState,
    pub(super) forward: Forward,
    /// The answer when no inline attempt serves: a chain's, or Envoy's
    /// own reply.
    pub(super) answer: Answer,
    deferred: Option<Deferred>,
}

impl Router {
    pub fn new(config: Rc<Config>, chains: bool) -> Self {
        Router {
            config,
            chains,
            phase: Phase::Start,
            req: RequestState::default(),
            forward: Forward::Not,
            answer: Answer::default(),
            deferred: None,
        }
    }

    /// The request is served without the upstream half: failover is off,
    /// or one target remained.
    pub(super) fn serves_alone(&self) -> bool {
        !self.chains || matches!(self.forward, Forward::Inline(_))
    }

    /// The body is complete: route, admit, forward.
    fn route_admit_forward(&mut self, host: &mut dyn Host, body_size: usize) -> Flow {
        let body = match host.request_body(body_size) {
            Ok(b) => b,
            Err(e) => {
                let error = internal(format!("could not read the request body: {e}"));
                return self.reject(host, error);
            }
        };
        keep_caller_path(host);
        let doc = match route::parse_body(&body) {
            Ok(doc) => doc,
            Err(e) => return self.reject(host, e),
        };
        let routed = match self.route(host, &body, &doc) {
            Ok(r) => r,
            Err(e) => return self.reject(host, e),
        };
        match self.admit(host, body.len(), &routed) {
            Err(e) => self.reject(host, e),
            Ok(Admit::Chain(chain)) => self.forward_or_reject(host, &body, &doc, &routed, chain),
            Ok(Admit::Deferred(id, chain)) => {
                drop(doc);
                self.deferred = Some(Deferred {
                    id,
                    body,
                    routed,
                    chain,
                });
                self.phase = Phase::Deferred;
                Flow::Pause
            }
        }
    }

    fn forward_or_reject(
        &mut self,
        host: &mut dyn Host,
        body: &[u8],
        doc: &TopLevel,
        routed: &Routed,
        chain: Vec<usize>,
    ) -> Flow {
        match self.forward(host, body, doc, &routed.call, chain) {
            Ok(()) => {
                self.phase = Phase::Forwarded;
                Flow::Continue
            }
            Err(error) => self.reject(host, error),
        }
    }

    pub(super) fn reject(&mut self, host: &mut dyn Host, error: ApiError) -> Flow {
        let body = exchange::error_body(self.req.caller, &error);
        let extra = std::mem::take(&mut self.req.answer_headers);
        let extra: Vec<(&str, &str)> = extra
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        self.reply(host, error.status, &extra, &body)
    }

    pub(super) fn reply(
        &mut self,
        host: &mut dyn Host,
        status: u16,
        extra: &[(&str, &str)],
        body: &[u8],
    ) -> Flow {
        // Nothing more will happen to this request: account for it now,
        // while access logs can still see the fields.
        self.req.status = status;
        self.phase = Phase::Answered;
        self.finish(host);
        let mut headers: Vec<(&str, &str)> = Vec::with_capacity(extra.len() + 1);
        headers.push(("content-type", "application/json"));
        headers.extend_from_slice(extra);
        if let Err(e) = host.send_response(status, &headers, body) {
            log::error!("could not send a local reply: {e}");
        }
        Flow::Pause
    }
}

impl ReadsBody for Router {
    fn phase(&self) -> Phase {
        self.phase
    }
    fn config(&self) -> &Config {
        &self.config
    }
    fn refuse(&mut self, host: &mut dyn Host, error: ApiError) -> Flow {
        self.reject(host, error)
    }
    fn body_complete(&mut self, host: &mut dyn Host, body_size: usize) -> Flow {
        self.route_admit_forward(host, body_size)
    }
}

impl Half for Router {
    fn on_request_headers(&mut self, host: &mut dyn Host, end_of_stream: bool) -> Flow {
        self.endpoint(host, end_of_stream)
    }

    fn on_request_body(
        &mut self,
        host: &mut dyn Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Flow {
        endpoint::body_chunk(self, host, body_size, end_of_stream)
    }

    fn on_request_trailers(&mut self, host: &mut dyn Host, body_size: usize) -> Flow {
        endpoint::body_trailers(self, host, body_size)
    }

    fn on_response_headers(&mut self, host: &mut dyn Host, end_of_stream: bool) -> Flow {
        self.response_headers_or_finish(host, end_of_stream)
    }

    fn on_response_body(
        &mut self,
        host: &mut dyn Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Flow {
        self.response_body_or_finish(host, body_size, end_of_stream)
    }

    /// The answer to a call a stage deferred on: the remaining stages run,
    /// and the paused request goes on (or is answered).
    fn on_callout(&mut self, host: &mut dyn Host, id: CalloutId, answer: CalloutAnswer) {
        let waiting =
            self.phase == Phase::Deferred && self.deferred.as_ref().is_some_and(|d| d.id == id);
        let Some(deferred) = self.deferred.take_if(|_| waiting) else {
            log::warn!(
                "an answer came for call {id}, which this request does not wait for: {answer:?}"
            );
            return;
        };
        let flow = match self.admit_answered(host, id, &answer) {
            Err(e) => self.reject(host, e),
            Ok(Some(again)) => {
                // Asked again (the store had lost its script): still paused.
                self.deferred = Some(Deferred {
                    id: again,
                    ..deferred
                });
                return;
            }
            Ok(None) => {
                let Deferred {
                    body,
                    routed,
                    chain,
                    ..
                } = deferred;
                match route::parse_body(&body) {
                    Ok(doc) => self.forward_or_reject(host, &body, &doc, &routed, chain),
                    Err(e) => self.reject(host, e),
                }
            }
        };
        // A reply of the filter's own ends the request; nothing to resume.
        if flow == Flow::Continue {
            if let Err(e) = host.resume_request() {
                log::error!("could not resume a request after call {id}: {e}");
            }
        }
    }

    fn on_done(&mut self, host: &mut dyn Host) {
        self.finish(host);
    }
}
