//! Guard stage, listener half: the caller's guardrail rules screen its
//! request before anything else reads the body (routing, quotas, the
//! providers), so what a rule redacts never leaves the pod and what it
//! blocks costs nothing. External rules on answers read a complete answer
//! while the listener holds it (the respond stage asks). Every decision is
//! counted and logged by rule and action, never with the content that
//! fired it.

use std::rc::Rc;

use super::answer::WHOLE_BUFFER;
use super::flow::{internal, Flow};
use super::state::Router;
use crate::config::models::Operation;
use crate::core::api_error::ApiError;
use crate::guard::external::{self, Verdict};
use crate::guard::json_text::{rewrite, text_values};
use crate::guard::policy::{Action, Check, GuardRule};
use crate::guard::screen::{screen_body, Decision};
use crate::guard::stream::{DecisionSink, StreamGuard};
use crate::host::{Callout, CalloutAnswer, CalloutId, CalloutKind, Host};
use crate::metrics;
use crate::translate::exchange;

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

/// What the guard stage decided.
pub(super) enum Guarded {
    /// Go on with this body (redacted, or as it came).
    Go(Vec<u8>),
    /// Waiting for an external guardrail's answer.
    Wait(GuardWait),
}

/// A request (or a held answer) waiting for an external guardrail.
pub(super) struct GuardWait {
    pub id: CalloutId,
    pub body: Vec<u8>,
    /// The rule asked, and the external rules still to ask after it.
    pub rule: usize,
    pub next: Vec<usize>,
    /// How many texts it was sent.
    pub sent: usize,
}

impl Router {
    /// The guard stage: the body to go on with (redacted, or as it came),
    /// a wait for an external guardrail, or the refusal of a blocking rule.
    pub(super) fn guard_request(
        &mut self,
        host: &mut dyn Host,
        body: Vec<u8>,
    ) -> Result<Guarded, ApiError> {
        let body = self.guard_built_in(host, body)?;
        let config = Rc::clone(&self.config);
        let externals = config
            .guardrails
            .select(self.req.applied.guardrails(&config), |r| {
                r.on_request && r.is_external()
            });
        let form = matches!(self.req.operation, Some(Operation::Passed(p)) if p.is_form());
        if externals.is_empty() || form {
            return Ok(Guarded::Go(body));
        }
        self.ask_external(host, body, externals, Side::Request)
    }

    /// A complete answer, held whole in the caller's shape: its external
    /// guardrails are asked. Some: the flow while they are (or the refusal
    /// that replaced the answer); None: the answer goes on.
    pub(super) fn guard_held_answer(&mut self, host: &mut dyn Host) -> Option<Flow> {
        let externals = self.answer_externals();
        if externals.is_empty() {
            return None;
        }
        let body = match host.response_body(WHOLE_BUFFER) {
            Ok(b) => b,
            Err(e) => {
                log::warn!("could not read an answer for its external guardrails: {e}");
                return None;
            }
        };
        match self.ask_external(host, body, externals, Side::Response) {
            Ok(Guarded::Go(_)) => None,
            Ok(Guarded::Wait(wait)) => {
                self.answer_wait = Some(wait);
                Some(Flow::Pause)
            }
            Err(error) => Some(self.withhold_answer(host, &error)),
        }
    }

    /// An external guardrail read the held answer: the next one is asked,
    /// or the answer goes on (as it is, or redacted), or is withheld.
    pub(super) fn answer_guard_answered(
        &mut self,
        host: &mut dyn Host,
        wait: GuardWait,
        answer: &CalloutAnswer,
    ) {
        match self.guard_answered(host, wait, answer, Side::Response) {
            Ok(Guarded::Wait(next)) => self.answer_wait = Some(next),
            Ok(Guarded::Go(_)) => {
                // The answer's last chunk passes now.
                self.cache_copy(host, true, true);
                self.finish(host);
                if let Err(e) = host.resume_response() {
                    log::error!("could not resume an answer after its guardrails: {e}");
                }
            }
            Err(error) => {
                self.withhold_answer(host, &error);
            }
        }
    }

    fn withhold_answer(&mut self, host: &mut dyn Host, error: &ApiError) -> Flow {
        let body = exchange::error_body(self.req.caller, error);
        self.replace_answer(host, error.status, &body)
    }

    /// The caller's external rules on answers.
    fn answer_externals(&self) -> Vec<usize> {
        self.config
            .guardrails
            .select(&self.req.answer_guard, GuardRule::is_external)
    }

    /// Asks the first of `externals` about the body's texts.
    fn ask_external(
        &mut self,
        host: &mut dyn Host,
        body: Vec<u8>,
        mut externals: Vec<usize>,
        side: Side,
    ) -> Result<Guarded, ApiError> {
        let config = Rc::clone(&self.config);
        let Some(rule) = (!externals.is_empty()).then(|| externals.remove(0)) else {
            return Ok(Guarded::Go(body));
        };
        let Some((name, external)) =
            config
                .guardrails
                .rules
                .get(rule)
                .and_then(|r| match &r.check {
                    Check::External(e) => Some((r.name.as_str(), e)),
                    _ => None,
                })
        else {
            return self.ask_external(host, body, externals, side);
        };
        let texts: Vec<String> = text_values(&body).into_iter().map(|v| v.text).collect();
        let ask = external::ask(side.name(), name, self.req.who.names(), &texts);
        let call = Callout {
            cluster: &external.cluster,
            kind: CalloutKind::Http {
                method: "POST",
                path: &external.path,
                authority: &external.authority,
                headers: &[("content-type", "application/json")],
                body: &ask,
            },
            timeout_ms: external.timeout_ms,
        };
        match host.call_out(&call) {
            Ok(id) => Ok(Guarded::Wait(GuardWait {
                id,
                body,
                rule,
                next: externals,
                sent: texts.len(),
            })),
            Err(e) => {
                let why = format!("the call could not be made: {e}");
                self.external_failed(host, rule, &why, side)?;
                self.ask_external(host, body, externals, side)
            }
        }
    }

    /// An external guardrail's answer: go on (with the next one, if any),
    /// redact, or refuse.
    pub(super) fn guard_answered(
        &mut self,
        host: &mut dyn Host,
        wait: GuardWait,
        answer: &CalloutAnswer,
        side: Side,
    ) -> Result<Guarded, ApiError> {
        let config = Rc::clone(&self.config);
        let Some(rule) = config.guardrails.rules.get(wait.rule) else {
            return self.ask_external(host, wait.body, wait.next, side);
        };
        let mut body = wait.body;
        match external::read(answer, wait.sent) {
            Err(why) => self.external_failed(host, wait.rule, &why, side)?,
            Ok(Verdict::Pass) => {}
            Ok(Verdict::Flagged { texts }) => {
                let decision = Decision {
                    rule: wait.rule,
                    action: rule.action,
                    found: vec!["external".into()],
                };
                let redacted = match (rule.action, texts) {
                    (Action::Flag, _) => None,
                    (Action::Redact, Some(texts)) => Some(texts),
                    // Flagged for redaction without the texts to send: the
                    // request cannot go as it is.
                    (Action::Redact, None) | (Action::Block, _) => {
                        let blocked_decision = Decision {
                            action: Action::Block,
                            ..decision
                        };
                        self.note_guard_decisions(host, side, &[blocked_decision]);
                        return Err(blocked(&rule.name, side));
                    }
                };
                self.note_guard_decisions(host, side, &[decision]);
                if let Some(texts) = redacted {
                    let edits: Vec<_> = text_values(&body)
                        .into_iter()
                        .zip(texts)
                        .filter(|(v, t)| v.text != *t)
                        .map(|(v, t)| (v.span, t))
                        .collect();
                    if !edits.is_empty() {
                        let new = rewrite(&body, &edits);
                        let rewritten = match side {
                            Side::Request => {
                                host.replace_request_body(body.len(), &new).and_then(|()| {
                                    host.set_request_header(
                                        "content-length",
                                        &new.len().to_string(),
                                    )
                                })
                            }
                            // The held answer's length was dropped when it
                            // was held for its guardrails.
                            Side::Response => host.replace_response_body(body.len(), &new),
                        };
                        rewritten.map_err(|e| {
                            internal(format!("could not rewrite the {}: {e}", side.name()))
                        })?;
                        body = new;
                    }
                }
            }
        }
        self.ask_external(host, body, wait.next, side)
    }

    /// No usable answer: counted and logged; the request goes on when the
    /// rule fails open, else it is refused with 503.
    fn external_failed(
        &mut self,
        host: &mut dyn Host,
        rule: usize,
        why: &str,
        side: Side,
    ) -> Result<(), ApiError> {
        let Some(r) = self.config.guardrails.rules.get(rule) else {
            return Ok(());
        };
        let (name, fail_open) = match &r.check {
            Check::External(e) => (r.name.clone(), e.fail_open),
            _ => return Ok(()),
        };
        log::warn!("external guardrail {name}: no answer ({why})");
        let outcome = if fail_open {
            "fail_open"
        } else {
            "fail_closed"
        };
        let (ns, svc) = self.req.who.names();
        host.count_labelled(
            metrics::GUARDRAIL_DECISIONS_TOTAL,
            &metrics::caller(ns, svc),
            &[
                ("guardrail", &name),
                ("action", outcome),
                ("stage", side.name()),
            ],
            1,
        );
        self.req
            .guard_log
            .push(format!("{name}:{outcome}:{}:unavailable", side.name()));
        if fail_open {
            return Ok(());
        }
        let what = match side {
            Side::Request => "requests",
            Side::Response => "answers",
        };
        Err(ApiError::new(
            503,
            "server_error",
            Some("guardrail_unavailable"),
            format!(
                "The gateway's guardrail `{name}` did not answer, and {what} do not pass \
                 without it."
            ),
        ))
    }

    /// The built-in rules on the request.
    fn guard_built_in(&mut self, host: &mut dyn Host, body: Vec<u8>) -> Result<Vec<u8>, ApiError> {
        let config = Rc::clone(&self.config);
        let all = &config.guardrails.rules;
        // Answers are screened where they are text: chat in every API.
        let caller_rules = self.req.applied.guardrails(&config);
        if self.req.operation == Some(Operation::ChatCompletions) {
            self.req.answer_guard = config.guardrails.select(caller_rules, |r| r.on_response);
        }
        let rules = config.guardrails.select(caller_rules, |r| r.on_request);
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
