//! Guard stage, listener half: the caller's guardrail rules screen its
//! request before anything else reads the body (routing, quotas, the
//! providers), so what a rule redacts never leaves the pod and what it
//! blocks costs nothing. Every decision is counted and logged by rule and
//! action, never with the content that fired it.

use std::rc::Rc;

use super::flow::internal;
use super::state::Router;
use crate::config::models::Operation;
use crate::core::api_error::ApiError;
use crate::guard::screen::{screen_body, Decision};
use crate::guard::stream::{DecisionSink, StreamGuard};
use crate::host::Host;
use crate::metrics;

/// Which side of the exchange a decision was made on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Side {
    Request,
    Response,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Request => "request",
            Side::Response => "response",
        }
    }
}

impl Router {
    /// The guard stage: the body to go on with (redacted, or as it came),
    /// or the refusal of a blocking rule.
    pub(super) fn guard_request(
        &mut self,
        host: &mut dyn Host,
        body: Vec<u8>,
    ) -> Result<Vec<u8>, ApiError> {
        let config = Rc::clone(&self.config);
        let all = &config.guardrails.rules;
        // Answers are screened where they are text: chat in every API.
        if self.req.operation == Some(Operation::ChatCompletions) {
            self.req.answer_guard = self
                .req
                .applied
                .guardrails(&config)
                .iter()
                .copied()
                .filter(|&i| all.get(i).is_some_and(|r| r.on_response))
                .collect();
        }
        let rules: Vec<usize> = self
            .req
            .applied
            .guardrails(&config)
            .iter()
            .copied()
            .filter(|&i| all.get(i).is_some_and(|r| r.on_request))
            .collect();
        // Uploads (audio, images) are not text.
        let form = matches!(self.req.operation, Some(Operation::Passed(p)) if p.is_form());
        if rules.is_empty() || form {
            return Ok(body);
        }
        let screened = screen_body(all, &rules, &body);
        self.note_guard_decisions(host, Side::Request, &screened.decisions);
        if let Some(i) = screened.blocked {
            let name = all.get(i).map_or("", |r| r.name.as_str());
            return Err(blocked(name, Side::Request));
        }
        let Some(redacted) = screened.body else {
            return Ok(body);
        };
        host.replace_request_body(body.len(), &redacted)
            .and_then(|()| host.set_request_header("content-length", &redacted.len().to_string()))
            .map_err(|e| internal(format!("could not rewrite the request body: {e}")))?;
        Ok(redacted)
    }

    /// The caller's guardrails on its streamed answer, leaving their
    /// decisions where `drain_stream_guard` finds them; None without any.
    pub(super) fn stream_guard(&mut self) -> Option<StreamGuard> {
        if self.req.answer_guard.is_empty() {
            return None;
        }
        let sink = DecisionSink::default();
        let guard = StreamGuard::new(
            self.req.caller,
            &self.config.guardrails.rules,
            &self.req.answer_guard,
            Rc::clone(&sink),
        )?;
        self.req.guard_sink = Some(sink);
        Some(guard)
    }

    /// Counts what a stream's guard decided since the last call.
    pub(super) fn drain_stream_guard(&mut self, host: &mut dyn Host) {
        let Some(sink) = &self.req.guard_sink else {
            return;
        };
        let decisions: Vec<Decision> = sink.borrow_mut().drain(..).collect();
        self.note_guard_decisions(host, Side::Response, &decisions);
    }

    /// Counts each decision and keeps it for the access log.
    pub(super) fn note_guard_decisions(
        &mut self,
        host: &mut dyn Host,
        side: Side,
        decisions: &[Decision],
    ) {
        if decisions.is_empty() {
            return;
        }
        let (ns, svc) = self.req.who.names();
        let labels = metrics::caller(ns, svc);
        for d in decisions {
            let name = self
                .config
                .guardrails
                .rules
                .get(d.rule)
                .map_or("", |r| r.name.as_str());
            host.count_labelled(
                metrics::GUARDRAIL_DECISIONS_TOTAL,
                &labels,
                &[
                    ("guardrail", name),
                    ("action", d.action.name()),
                    ("stage", side.name()),
                ],
                1,
            );
            self.req.guard_log.push(format!(
                "{name}:{}:{}:{}",
                d.action.name(),
                side.name(),
                d.found.join("+")
            ));
        }
    }
}

/// A blocking rule's refusal, as providers refuse content: 400
/// `content_policy_violation` (in each caller's shape). It names the rule,
/// never the content.
pub(super) fn blocked(rule: &str, side: Side) -> ApiError {
    let what = match side {
        Side::Request => "The request was blocked",
        Side::Response => "The answer was withheld",
    };
    ApiError::new(
        400,
        "invalid_request_error",
        Some("content_policy_violation"),
        format!("{what} by the gateway's guardrail `{rule}`."),
    )
}
