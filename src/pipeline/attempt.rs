//! One attempt at one target: translate → point → respond → settle.
//!
//! An attempt runs either inline, in the listener half (its [`Router`]
//! serves a single target itself and holds the answer's headers while it
//! translates), or upstream, in the upstream half on one try of a chain
//! Envoy walks (it reads the plan from `handoff.rs`, lets translated
//! headers pass and hands the usage back). Which one is fixed when the
//! attempt is made. Its state is in `state.rs`, each stage's work in the
//! stage's file; here the upstream half runs them in order.
//!
//! [`Router`]: super::Router

use std::rc::Rc;

use super::answer::Step;
use super::flow::{internal, Flow};
use super::point::ANTHROPIC_HEADERS;
use super::request::{self, ReadsBody};
use super::settle::attempt_labels;
use super::state::{Attempt, AttemptEnd, Phase, RequestHeaders};
use super::Half;
use crate::config::Config;
use crate::core::api_error::ApiError;
use crate::core::schema::Schema;
use crate::host::{CalloutAnswer, CalloutId, Host, HostResult};
use crate::metrics;
use crate::pipeline::handoff::{self, ATTEMPTS_RESPONSE_HEADER};
use crate::translate::exchange;

impl Attempt {
    // ---- the upstream half's request side -------------------------------

    /// Finds this attempt's target from the plan and the host Envoy picked,
    /// and clears what an earlier attempt set.
    fn start(&mut self, host: &mut dyn Host) -> Result<(), Flow> {
        // A plan naming models this configuration lacks (garbled, or left
        // under another configuration) is no plan.
        let models = self.config.models.len();
        let plan = handoff::plan(host).filter(|p| p.chain.iter().all(|&m| m < models));
        let Some(plan) = plan else {
            // Another service's request on a router this half also serves.
            let authority = host.request_header(":authority").unwrap_or_default();
            if !self.config.hosts.is_empty() && !self.config.handles_host(&authority) {
                self.phase = Phase::Bypass;
                return Err(Flow::Continue);
            }
            return Err(self.reject(
                host,
                internal(
                    "no routing plan reached the upstream filter; the meshllm listener \
                     filter must run on this route"
                        .into(),
                ),
            ));
        };
        self.caller = plan.caller;
        self.number = host
            .request_header("x-envoy-attempt-count")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1);
        let position = handoff::attempt_position(host);
        let Some(&target) = position.and_then(|p| plan.chain.get(p)) else {
            let error = internal(format!(
                "attempt {} reached an upstream host outside the plan (position {position:?})",
                self.number
            ));
            return Err(self.reject(host, error));
        };
        self.target = Some(target);
        self.started_us = host.now_unix_micros();
        if let Some(&previous) = position.and_then(|p| plan.chain.get(p.checked_sub(1)?)) {
            let config = &self.config;
            let from = &config.providers[config.models[previous].provider].name;
            let labels = attempt_labels(config, &plan, target);
            host.count_labelled(
                metrics::FALLBACKS_TOTAL,
                &labels,
                &[("fallback_from", from)],
                1,
            );
        }
        // Envoy hands every attempt the same header map: clear what an
        // earlier attempt set for another provider.
        let config = Rc::clone(&self.config);
        let stale = config
            .attempt_header_names
            .iter()
            .map(String::as_str)
            .chain(ANTHROPIC_HEADERS.iter().copied())
            .chain(["x-envoy-attempt-count", "x-envoy-expected-rq-timeout-ms"]);
        let mut cleared: HostResult = Ok(());
        let present = RequestHeaders::list(host);
        for name in stale {
            if present.has(host, name) {
                cleared = cleared.and_then(|()| host.remove_request_header(name));
            }
        }
        if config.models[target].schema == Schema::Anthropic {
            for (name, value) in &plan.anthropic {
                cleared = cleared.and_then(|()| host.set_request_header(name, value));
            }
        }
        // A header left from another provider's attempt could carry its key.
        if let Err(e) = cleared {
            let error = internal(format!("could not reset the request headers: {e}"));
            return Err(self.reject(host, error));
        }
        self.operation = plan.operation;
        self.plan = Some(plan);
        Ok(())
    }

    fn request_complete(&mut self, host: &mut dyn Host, body_size: usize) -> Flow {
        let body = match host.request_body(body_size) {
            Ok(b) => b,
            Err(e) => {
                let error = internal(format!("could not read the request body: {e}"));
                return self.reject(host, error);
            }
        };
        let gemini = self.plan.as_ref().and_then(|p| p.gemini.clone());
        let prepared = request::parse_body(&body, self.operation).and_then(|doc| {
            let call =
                request::read_call((&body, &doc), self.operation, self.caller, gemini.as_ref())?;
            self.prepare(host, &body, &doc, &call, None)
        });
        match prepared {
            Ok(()) => {
                self.phase = Phase::Forwarded;
                Flow::Continue
            }
            Err(error) => self.reject(host, error),
        }
    }

    // ---- the upstream half's answers ------------------------------------

    fn reject(&mut self, host: &mut dyn Host, error: ApiError) -> Flow {
        let body = exchange::error_body(self.caller, &error);
        self.reply(host, error.status, &[], &body)
    }

    /// Answers from the upstream half. It names its attempt, so the
    /// listener half knows the body is already in the caller's shape.
    fn reply(
        &mut self,
        host: &mut dyn Host,
        status: u16,
        extra: &[(&str, &str)],
        body: &[u8],
    ) -> Flow {
        self.answer.status = status;
        self.phase = Phase::Answered;
        let attempt = self.number.to_string();
        let mut headers: Vec<(&str, &str)> = Vec::with_capacity(extra.len() + 2);
        headers.push(("content-type", "application/json"));
        headers.extend_from_slice(extra);
        headers.push((ATTEMPTS_RESPONSE_HEADER, &attempt));
        if !self.outcome_recorded {
            self.outcome_recorded = true;
            self.count_attempt(host, AttemptEnd::Answered(status));
        }
        if let Err(e) = host.send_response(status, &headers, body) {
            log::error!("could not send a local reply: {e}");
        }
        Flow::Pause
    }

    fn take_step(&mut self, host: &mut dyn Host, step: Step) -> Flow {
        match step {
            Step::Go(flow) => flow,
            Step::Replace(status, body) => {
                // The upstream half names its attempt itself (see `reply`).
                let kept = self.answer.kept_headers(host, false);
                let extra: Vec<(&str, &str)> =
                    kept.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
                self.reply(host, status, &extra, &body)
            }
        }
    }
}

impl ReadsBody for Attempt {
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
        self.request_complete(host, body_size)
    }
}

/// The upstream half's callbacks (an inline attempt's are the Router's).
impl Half for Attempt {
    fn on_request_headers(&mut self, host: &mut dyn Host, end_of_stream: bool) -> Flow {
        if let Err(flow) = self.start(host) {
            return flow;
        }
        if end_of_stream {
            return self.reject(host, request::missing_body());
        }
        self.phase = Phase::ReadingBody;
        Flow::Pause
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
        if matches!(self.phase, Phase::Bypass | Phase::Answered) {
            return Flow::Continue;
        }
        self.begin_answer(host);
        let step = self.answer_headers(host, end_of_stream);
        self.take_step(host, step)
    }

    fn on_response_body(
        &mut self,
        host: &mut dyn Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Flow {
        if self.phase == Phase::Bypass {
            return Flow::Continue;
        }
        let step = self.response_body(host, body_size, end_of_stream);
        self.take_step(host, step)
    }

    fn on_callout(&mut self, _host: &mut dyn Host, id: CalloutId, answer: CalloutAnswer) {
        log::warn!(
            "an answer came for call {id}, which this attempt does not wait for: {answer:?}"
        );
    }

    fn on_done(&mut self, host: &mut dyn Host) {
        if self.phase == Phase::Forwarded && !self.outcome_recorded {
            self.outcome_recorded = true;
            if let Some(end) = self.unanswered(host) {
                self.record_outcome(host, end);
            }
        }
    }
}
