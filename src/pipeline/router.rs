//! The listener half: endpoint → identify → route → admit → forward, then
//! `finish` once the answer is complete. It hands Envoy a chain of
//! targets (each try served by an upstream [`Attempt`]) or runs its one
//! attempt inline. Its state is in `state.rs`, each stage's work in the
//! stage's file; here the stages run in order.
//!
//! [`Attempt`]: super::Attempt

use super::admit::Admit;
use super::cache::Looked;
use super::finish::keep_caller_path;
use super::flow::{internal, Flow};
use super::guard::{GuardWait, Guarded, Side};
use super::request::{self, ReadsBody};
use super::state::{Deferred, Phase, Routed, Router};
use super::Half;
use crate::config::models::Operation;
use crate::config::Config;
use crate::core::api_error::ApiError;
use crate::core::json::TopLevel;
use crate::host::{CalloutAnswer, CalloutId, Host};

impl Router {
    /// The body is complete: guard, route, admit, forward.
    fn route_admit_forward(&mut self, host: &mut dyn Host, body_size: usize) -> Flow {
        let body = match host.request_body(body_size) {
            Ok(b) => b,
            Err(e) => {
                let error = internal(format!("could not read the request body: {e}"));
                return self.reject(host, error);
            }
        };
        keep_caller_path(host, &self.req.path);
        match self.guard_request(host, body) {
            Ok(Guarded::Go(body)) => self.route_admit_forward_body(host, body),
            Ok(Guarded::Wait(wait)) => {
                self.guard_wait = Some(wait);
                self.phase = Phase::Deferred;
                Flow::Pause
            }
            Err(e) => self.reject(host, e),
        }
    }

    /// Route, admit, forward, with the body the guard stage let go.
    fn route_admit_forward_body(&mut self, host: &mut dyn Host, body: Vec<u8>) -> Flow {
        let doc = match request::parse_body(
            &body,
            self.req.operation.unwrap_or(Operation::ChatCompletions),
        ) {
            Ok(doc) => doc,
            Err(e) => return self.reject(host, e),
        };
        let routed = match self.route(host, &body, &doc) {
            Ok(r) => r,
            Err(e) => return self.reject(host, e),
        };
        // An upload's bytes (audio, images) are not prompt text.
        let prompt_bytes = match self.req.operation {
            Some(Operation::Passed(p)) if p.is_form() => 0,
            _ => body.len(),
        };
        match self.admit(host, prompt_bytes, &routed) {
            Err(e) => self.reject(host, e),
            Ok(Admit::Chain(chain)) => match self.cache_lookup(host, &body, &routed) {
                Looked::Miss => self.forward_or_reject(host, &body, &doc, &routed, chain),
                Looked::Hit(flow) => flow,
                Looked::Ask(id) => {
                    drop(doc);
                    self.wait_for_cache(Deferred {
                        id,
                        body,
                        routed,
                        chain,
                    })
                }
            },
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

    pub(super) fn forward_or_reject(
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
}

impl Router {
    /// An external guardrail answered: the next one is asked (None: still
    /// waiting), or the remaining stages run.
    fn guard_callout(
        &mut self,
        host: &mut dyn Host,
        wait: GuardWait,
        answer: &CalloutAnswer,
    ) -> Option<Flow> {
        Some(
            match self.guard_answered(host, wait, answer, Side::Request) {
                Ok(Guarded::Go(body)) => {
                    self.phase = Phase::ReadingBody;
                    self.route_admit_forward_body(host, body)
                }
                Ok(Guarded::Wait(next)) => {
                    self.guard_wait = Some(next);
                    return None;
                }
                Err(e) => self.reject(host, e),
            },
        )
    }

    /// The quota store answered: asked again (None: still waiting), or the
    /// request is forwarded or refused.
    fn admit_callout(
        &mut self,
        host: &mut dyn Host,
        deferred: Deferred,
        answer: &CalloutAnswer,
    ) -> Option<Flow> {
        Some(match self.admit_answered(host, deferred.id, answer) {
            Err(e) => self.reject(host, e),
            Ok(Some(again)) => {
                // Asked again (the store had lost its script): still paused.
                self.deferred = Some(Deferred {
                    id: again,
                    ..deferred
                });
                return None;
            }
            Ok(None) => self.forward_after_wait(host, deferred, true),
        })
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
        request::body_chunk(self, host, body_size, end_of_stream)
    }

    fn on_request_trailers(&mut self, host: &mut dyn Host, body_size: usize) -> Flow {
        request::body_trailers(self, host, body_size)
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
        let deferred = self.phase == Phase::Deferred;
        let flow = if let Some(wait) = self.guard_wait.take_if(|w| deferred && w.id == id) {
            self.guard_callout(host, wait, &answer)
        } else if let Some(waiting) = self.deferred.take_if(|d| deferred && d.id == id) {
            self.admit_callout(host, waiting, &answer)
        } else if let Some(waiting) = self.cache_wait.take_if(|d| deferred && d.id == id) {
            Some(self.cache_answered(host, waiting, &answer))
        } else if let Some(wait) = self.answer_wait.take_if(|w| w.id == id) {
            // The answer resumes (or is replaced) there.
            self.answer_guard_answered(host, wait, &answer);
            return;
        } else {
            log::warn!(
                "an answer came for call {id}, which this request does not wait for: {answer:?}"
            );
            return;
        };
        // Still waiting, or a reply of the filter's own ended the request:
        // nothing to resume.
        if flow == Some(Flow::Continue) {
            if let Err(e) = host.resume_request() {
                log::error!("could not resume a request after call {id}: {e}");
            }
        }
    }

    fn on_done(&mut self, host: &mut dyn Host) {
        self.finish(host);
    }
}
