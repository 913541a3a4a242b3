//! Respond stage: the provider's answer (or Envoy's own reply) on its way
//! to the caller. Errors become the caller's shape
//! (`translate/exchange.rs`), answers are translated whole or event by
//! event, streams are scrubbed of provider keys, held answers are limited
//! in size. The listener half also puts the caller's own headers on the
//! answer and holds a chain's complete answers to its end.

use super::answer::{bodiless, reply_status, rewrites_body, ResponseMode, Serving, Step};
use super::flow::Flow;
use super::guard::{blocked, Side};
use super::state::{Attempt, AttemptEnd, ClusterChoice, Forward, Phase, Place, Router};
use crate::config::providers::Provider;
use crate::config::Config;
use crate::core::api_error::ApiError;
use crate::guard::screen::{screen_body, Screened};
use crate::host::Host;
use crate::pipeline::handoff::{
    self, ATTEMPTS_RESPONSE_HEADER, MODEL_RESPONSE_HEADER, PROVIDER_RESPONSE_HEADER,
    ROUTE_RESPONSE_HEADER,
};
use crate::translate::exchange::{self, ErrorReply};
use crate::translate::{Chain, StreamTranslator};
use std::rc::Rc;

/// Provider rate-limit headers describe the gateway's account with the
/// provider, not the caller's limits: dropped when quotas are configured.
pub(super) const PROVIDER_RATE_LIMIT_HEADERS: &[&str] = &[
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
    "anthropic-ratelimit-requests-limit",
    "anthropic-ratelimit-requests-remaining",
    "anthropic-ratelimit-requests-reset",
    "anthropic-ratelimit-tokens-limit",
    "anthropic-ratelimit-tokens-remaining",
    "anthropic-ratelimit-tokens-reset",
    "anthropic-ratelimit-input-tokens-limit",
    "anthropic-ratelimit-input-tokens-remaining",
    "anthropic-ratelimit-input-tokens-reset",
    "anthropic-ratelimit-output-tokens-limit",
    "anthropic-ratelimit-output-tokens-remaining",
    "anthropic-ratelimit-output-tokens-reset",
];

impl Attempt {
    /// The answer's status, and with health, how the attempt ended.
    pub(super) fn begin_answer(&mut self, host: &mut dyn Host) {
        self.answer.read_status(host);
        let status = self.answer.status;
        if self.phase == Phase::Forwarded && self.records_health() {
            // The upstream half only ever sees a provider's answers; the
            // listener half also sees Envoy's own replies, and only those
            // about the provider (refused, reset, timed out) count.
            let end = if self.place == Place::Upstream || status < 400 {
                Some(AttemptEnd::Answered(status))
            } else {
                AttemptEnd::of_envoy_reply(status, host.response_code_details().as_deref())
            };
            match end {
                Some(end) => self.record_outcome(host, end),
                None => self.outcome_recorded = true,
            }
        }
    }

    /// The answer's headers: what served it, and how its body is handled.
    pub(super) fn answer_headers(&mut self, host: &mut dyn Host, end_of_stream: bool) -> Step {
        let forwarded = self.phase == Phase::Forwarded;
        if forwarded {
            if let (Some(provider), Some(route)) = (self.provider(), self.route()) {
                let _ = host.set_response_header(PROVIDER_RESPONSE_HEADER, &provider.name);
                let _ = host.set_response_header(MODEL_RESPONSE_HEADER, &route.upstream_model);
            }
            if let Some(plan) = &self.plan {
                let _ =
                    host.set_response_header(ATTEMPTS_RESPONSE_HEADER, &self.number.to_string());
                let _ = host.set_response_header(ROUTE_RESPONSE_HEADER, &plan.reason);
            } else if self.place == Place::Inline(ClusterChoice::FirstPosition) {
                // What the upstream half says of a chain's attempts.
                let _ = host.set_response_header(ATTEMPTS_RESPONSE_HEADER, "1");
                if let Some(reason) = &self.route_reason {
                    let _ = host.set_response_header(ROUTE_RESPONSE_HEADER, reason);
                }
            }
        }
        let upstream = self.place == Place::Upstream;
        if self.answer.status >= 400 {
            let serving = Serving {
                config: &self.config,
                caller: self.caller,
                provider: self.route().map(|r| r.provider),
                exchange: self.exchange.as_ref(),
            };
            return self
                .answer
                .error_headers(host, end_of_stream, &serving, upstream);
        }
        let ok = (200..300).contains(&self.answer.status);
        let Some(x) = self.exchange.as_ref().filter(|_| forwarded) else {
            // Embeddings: forwarded as they are, usage read on the way.
            if forwarded && ok && !end_of_stream {
                self.answer.mode = ResponseMode::Watch(Vec::new());
            }
            return Step::Go(Flow::Continue);
        };
        if !ok || end_of_stream {
            return Step::Go(Flow::Continue);
        }
        if x.stream {
            // Provider error events may quote the key: the stream is redacted.
            let secrets = self.provider().map(Provider::secrets).unwrap_or_default();
            let created = host.now_unix_seconds();
            let translator = exchange::stream_translator(x, created, &secrets);
            // The caller's answer guardrails read what the caller would get.
            let guarded: Option<Box<dyn StreamTranslator>> =
                match (translator, self.stream_guard.take()) {
                    (Some(t), Some(g)) => Some(Box::new(Chain::new(t, g))),
                    (Some(t), None) => Some(t),
                    (None, Some(g)) => Some(Box::new(g)),
                    (None, None) => None,
                };
            if let Some(translator) = guarded {
                rewrites_body(host, "text/event-stream");
                self.answer.mode = ResponseMode::Stream(translator);
            }
            return Step::Go(Flow::Continue);
        }
        // Answer guardrails read the answer whole, as a translation does.
        if exchange::translates_response(x) || !self.answer_guard.is_empty() {
            rewrites_body(host, "application/json");
            self.answer.mode = ResponseMode::Translate;
            // Hold the headers: an answer that cannot be translated must not
            // go out as a 200. The upstream half lets them pass (the listener
            // half holds them): held there, Envoy would take a provider
            // that broke off mid-answer for one that never answered, and
            // send the request to the next target too.
            return Step::Go(if upstream {
                Flow::Continue
            } else {
                Flow::Pause
            });
        }
        self.answer.mode = ResponseMode::Watch(Vec::new());
        Step::Go(Flow::Continue)
    }

    /// Whether the answer's bytes reach the caller as they pass.
    pub(super) fn answer_passes(&self) -> bool {
        self.answer.mode.passes()
    }

    pub(super) fn response_body(
        &mut self,
        host: &mut dyn Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Step {
        if let ResponseMode::Stream(translator) = &mut self.answer.mode {
            let flow = translate_stream_chunk(host, translator.as_mut(), body_size, end_of_stream);
            if end_of_stream {
                let usage = translator.usage();
                self.note_usage(host, usage);
            }
            return Step::Go(flow);
        }
        let provider_schema = self.provider_schema();
        if let ResponseMode::Watch(copy) = &mut self.answer.mode {
            // Complete answers are small; past this size usage is estimated.
            const MAX_WATCHED: usize = 1 << 20;
            if body_size > 0 && copy.len() + body_size <= MAX_WATCHED {
                match host.response_body(body_size) {
                    Ok(chunk) => copy.extend_from_slice(&chunk),
                    Err(e) => log::debug!("could not read an answer for its usage: {e}"),
                }
            }
            if end_of_stream {
                let usage = crate::translate::usage_of_answer(provider_schema, copy);
                self.note_usage(host, usage);
            }
            return Step::Go(Flow::Continue);
        }
        match self.answer.mode {
            ResponseMode::Error { .. } => {
                let serving = Serving {
                    config: &self.config,
                    caller: self.caller,
                    provider: self.route().map(|r| r.provider),
                    exchange: self.exchange.as_ref(),
                };
                self.answer
                    .error_body(host, body_size, end_of_stream, &serving)
            }
            ResponseMode::Translate => self.translated_body(host, body_size, end_of_stream),
            _ => Step::Go(Flow::Continue),
        }
    }

    /// A complete answer, held whole and translated.
    fn translated_body(
        &mut self,
        host: &mut dyn Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Step {
        let upstream = self.place == Place::Upstream;
        if body_size > self.config.max_response_bytes {
            if upstream {
                // Its headers passed (see `Translate`): the listener half
                // holds this answer and refuses it past the same limit.
                self.answer.mode = ResponseMode::PassThrough;
                return Step::Go(Flow::Continue);
            }
            let serving = Serving {
                config: &self.config,
                caller: self.caller,
                provider: self.route().map(|r| r.provider),
                exchange: self.exchange.as_ref(),
            };
            return self.answer.too_large(&serving);
        }
        if !end_of_stream {
            return Step::Go(Flow::Pause);
        }
        self.answer.mode = ResponseMode::PassThrough;
        let body = match host.response_body(body_size) {
            Ok(b) => b,
            Err(e) => {
                log::warn!("could not read a response body: {e}");
                return Step::Go(Flow::Continue);
            }
        };
        let provider_schema = self.provider_schema();
        let usage = crate::translate::usage_of_answer(provider_schema, &body);
        self.note_usage(host, usage);
        let translated = match &self.exchange {
            Some(x) => exchange::translate_response(x, &body, host.now_unix_seconds()),
            None => Ok(None),
        };
        let new_body = match translated {
            Ok(b) => b,
            Err(e) => {
                log::warn!("could not translate a provider answer: {e}");
                self.answer.status = 502;
                if upstream {
                    // The headers passed already; the listener half
                    // holds them and sets this status.
                    let _ = handoff::leave_answer_status(host, 502);
                } else {
                    let _ = host.set_response_header(":status", "502");
                }
                let provider = self.provider().map_or("none", |p| p.name.as_str());
                let error = ApiError::new(
                    502,
                    "server_error",
                    Some("invalid_provider_response"),
                    format!(
                        "Provider {provider:?} sent an answer the gateway could not \
                         translate: {e}."
                    ),
                );
                Some(exchange::error_body(self.caller, &error))
            }
        };
        let new_body = match self.screen_answer(new_body.as_deref().unwrap_or(&body)) {
            ScreenedAnswer::AsIs => new_body,
            ScreenedAnswer::Redacted(b) => Some(b),
            ScreenedAnswer::Blocked(error) => {
                self.answer.status = error.status;
                let _ = host.set_response_header(":status", &error.status.to_string());
                Some(exchange::error_body(self.caller, &error))
            }
        };
        if let Some(new_body) = new_body {
            if let Err(e) = host.replace_response_body(body_size, &new_body) {
                log::warn!("could not rewrite a response body: {e}");
            }
        }
        Step::Go(Flow::Continue)
    }

    /// The caller's answer guardrails on a complete 2xx answer in its
    /// shape; the decisions wait for the listener half to count them.
    fn screen_answer(&mut self, body: &[u8]) -> ScreenedAnswer {
        if self.answer_guard.is_empty() || !(200..300).contains(&self.answer.status) {
            return ScreenedAnswer::AsIs;
        }
        let config = Rc::clone(&self.config);
        let mut screened = screen_body(&config.guardrails.rules, &self.answer_guard, body);
        self.guard_decisions = std::mem::take(&mut screened.decisions);
        screened.verdict(&config)
    }
}

/// A complete answer after the answer guardrails.
pub(super) enum ScreenedAnswer {
    AsIs,
    Redacted(Vec<u8>),
    /// Withheld: the caller gets this error instead.
    Blocked(ApiError),
}

impl Screened {
    pub(super) fn verdict(self, config: &Config) -> ScreenedAnswer {
        if let Some(i) = self.blocked {
            let name = config
                .guardrails
                .rules
                .get(i)
                .map_or("", |r| r.name.as_str());
            return ScreenedAnswer::Blocked(blocked(name, Side::Response));
        }
        match self.body {
            Some(b) => ScreenedAnswer::Redacted(b),
            None => ScreenedAnswer::AsIs,
        }
    }
}

impl Router {
    /// The answer's headers; the request is finished when they end it.
    pub(super) fn response_headers_or_finish(
        &mut self,
        host: &mut dyn Host,
        end_of_stream: bool,
    ) -> Flow {
        if self.phase == Phase::Bypass {
            return Flow::Continue;
        }
        let flow = if self.phase == Phase::Answered {
            Flow::Continue
        } else {
            self.response_headers(host, end_of_stream)
        };
        if end_of_stream {
            self.finish(host);
        }
        flow
    }

    /// A chunk of the answer; the request is finished with the last.
    pub(super) fn response_body_or_finish(
        &mut self,
        host: &mut dyn Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Flow {
        if self.phase == Phase::Bypass {
            return Flow::Continue;
        }
        let flow = self.router_body(host, body_size, end_of_stream);
        // An answer its external guardrails are reading finishes after them.
        if end_of_stream && self.answer_wait.is_none() {
            self.finish(host);
        }
        flow
    }

    fn response_headers(&mut self, host: &mut dyn Host, end_of_stream: bool) -> Flow {
        if let Forward::Inline(attempt) = &mut self.forward {
            attempt.begin_answer(host);
            self.req.status = attempt.answer.status;
            self.decorate_answer(host);
            let Forward::Inline(attempt) = &mut self.forward else {
                return Flow::Continue;
            };
            let step = attempt.answer_headers(host, end_of_stream);
            self.req.status = attempt.answer.status;
            return self.take_step(host, step);
        }
        self.answer.read_status(host);
        self.req.status = self.answer.status;
        if self.phase == Phase::Forwarded {
            self.decorate_answer(host);
        }
        if let Forward::Chain(chain) = &mut self.forward {
            // The upstream half answered: it put the answer in the caller's
            // shape and named what served; only Envoy's own replies need
            // work here. (Read here: response headers cannot be read once
            // the body flows.)
            if let Some(attempts) = host.response_header(ATTEMPTS_RESPONSE_HEADER) {
                chain.attempts = attempts.parse().unwrap_or(0);
                chain.served = host
                    .response_header(PROVIDER_RESPONSE_HEADER)
                    .zip(host.response_header(MODEL_RESPONSE_HEADER));
                let status = self.answer.status;
                if !self.req.streaming && (200..300).contains(&status) && !end_of_stream {
                    self.answer.mode = ResponseMode::Hold;
                    if !self.req.answer_guard.is_empty() {
                        // A redaction changes its length.
                        let _ = host.remove_response_header("content-length");
                    }
                    return Flow::Pause;
                }
                self.answer.mode = ResponseMode::PassThrough;
                if self.req.streaming && (200..300).contains(&status) && !end_of_stream {
                    if let Some(guard) = self.stream_guard() {
                        rewrites_body(host, "text/event-stream");
                        self.answer.mode = ResponseMode::Stream(Box::new(guard));
                    }
                }
                if end_of_stream && status >= 400 {
                    // A provider's bodiless error, left for Envoy to retry:
                    // the last one is answered here, in the caller's shape.
                    return self.answer_bodiless_error(host);
                }
                return Flow::Continue;
            }
        }
        if self.answer.status >= 400 {
            let serving = Serving {
                config: &self.config,
                caller: self.req.caller,
                provider: self.answering_provider(),
                exchange: None,
            };
            let step = self
                .answer
                .error_headers(host, end_of_stream, &serving, false);
            self.req.status = self.answer.status;
            return self.take_step(host, step);
        }
        Flow::Continue
    }

    /// The caller's rate-limit state, budget alerts and downgrades go on
    /// the answer, in place of the provider's own limits.
    fn decorate_answer(&mut self, host: &mut dyn Host) {
        if self.config.quotas.is_some() || !self.req.applied.rules().is_empty() {
            // One call lists the headers, so only those present cost a
            // removal (unlisted: remove every name, absent ones are no-ops).
            let present = host.response_header_names().ok();
            for name in PROVIDER_RATE_LIMIT_HEADERS {
                let listed = present
                    .as_ref()
                    .is_none_or(|names| names.iter().any(|n| n.eq_ignore_ascii_case(name)));
                if listed {
                    let _ = host.remove_response_header(name);
                }
            }
        }
        for (name, value) in &self.req.answer_headers {
            let _ = host.set_response_header(name, value);
        }
    }

    fn router_body(&mut self, host: &mut dyn Host, body_size: usize, end_of_stream: bool) -> Flow {
        let passes = match &self.forward {
            Forward::Inline(attempt) => attempt.answer_passes(),
            _ => self.answer.mode.passes(),
        };
        if passes {
            self.req.response_bytes += body_size as u64;
            if body_size > 0 && self.req.first_byte_us.is_none() {
                self.req.first_byte_us = Some(host.now_unix_micros());
            }
        }
        if let Forward::Inline(attempt) = &mut self.forward {
            let held = matches!(attempt.answer.mode, ResponseMode::Translate);
            let step = attempt.response_body(host, body_size, end_of_stream);
            self.req.status = attempt.answer.status;
            let decisions = std::mem::take(&mut attempt.guard_decisions);
            self.note_guard_decisions(host, Side::Response, &decisions);
            self.drain_stream_guard(host);
            return self.after_answer_step(host, step, held, end_of_stream);
        }
        let held = matches!(self.answer.mode, ResponseMode::Hold);
        let serving = Serving {
            config: &self.config,
            caller: self.req.caller,
            provider: self.answering_provider(),
            exchange: None,
        };
        let step = match self.answer.mode {
            ResponseMode::Hold => {
                // Held whole here: past the limit the caller gets an error
                // in its shape, not Envoy's.
                if body_size > self.config.max_response_bytes {
                    self.answer.too_large(&serving)
                } else if !end_of_stream {
                    Step::Go(Flow::Pause)
                } else {
                    self.answer.mode = ResponseMode::PassThrough;
                    self.req.response_bytes += body_size as u64;
                    self.req.first_byte_us = Some(host.now_unix_micros());
                    if let Some(status) = handoff::answer_status(host) {
                        self.answer.status = status;
                        let _ = host.set_response_header(":status", &status.to_string());
                    }
                    self.screen_held_answer(host, body_size)
                }
            }
            ResponseMode::Error { .. } => {
                self.answer
                    .error_body(host, body_size, end_of_stream, &serving)
            }
            ResponseMode::Stream(ref mut guard) => Step::Go(translate_stream_chunk(
                host,
                guard.as_mut(),
                body_size,
                end_of_stream,
            )),
            _ => Step::Go(Flow::Continue),
        };
        self.drain_stream_guard(host);
        self.req.status = self.answer.status;
        self.after_answer_step(host, step, held, end_of_stream)
    }

    /// A complete answer held whole is read by its external guardrails
    /// before it goes on; any other chunk goes on at once.
    fn after_answer_step(
        &mut self,
        host: &mut dyn Host,
        step: Step,
        held: bool,
        end_of_stream: bool,
    ) -> Flow {
        let whole = held && end_of_stream && matches!(step, Step::Go(Flow::Continue));
        if whole && (200..300).contains(&self.req.status) {
            if let Some(flow) = self.guard_held_answer(host) {
                return flow;
            }
        }
        self.copy_and_take_step(host, step, end_of_stream)
    }

    /// The response cache copies what passes (a held chunk passes later,
    /// whole; a replaced answer is not the provider's).
    fn copy_and_take_step(&mut self, host: &mut dyn Host, step: Step, end_of_stream: bool) -> Flow {
        let passed = match step {
            Step::Go(Flow::Continue) => true,
            Step::Go(_) => return self.take_step(host, step),
            Step::Replace(..) => false,
        };
        self.cache_copy(host, passed, end_of_stream);
        self.take_step(host, step)
    }

    fn take_step(&mut self, host: &mut dyn Host, step: Step) -> Flow {
        match step {
            Step::Go(flow) => flow,
            Step::Replace(status, body) => self.replace_answer(host, status, &body),
        }
    }

    /// A chain's complete answer, held here, after the caller's answer
    /// guardrails.
    fn screen_held_answer(&mut self, host: &mut dyn Host, body_size: usize) -> Step {
        if self.req.answer_guard.is_empty() || !(200..300).contains(&self.answer.status) {
            return Step::Go(Flow::Continue);
        }
        let body = match host.response_body(body_size) {
            Ok(b) => b,
            Err(e) => {
                log::warn!("could not read an answer to screen: {e}");
                return Step::Go(Flow::Continue);
            }
        };
        let config = Rc::clone(&self.config);
        let screened = screen_body(&config.guardrails.rules, &self.req.answer_guard, &body);
        let decisions = screened.decisions.clone();
        self.note_guard_decisions(host, Side::Response, &decisions);
        match screened.verdict(&config) {
            ScreenedAnswer::AsIs => Step::Go(Flow::Continue),
            ScreenedAnswer::Redacted(new) => {
                if let Err(e) = host.replace_response_body(body_size, &new) {
                    log::warn!("could not rewrite a response body: {e}");
                }
                Step::Go(Flow::Continue)
            }
            ScreenedAnswer::Blocked(error) => {
                let body = exchange::error_body(self.req.caller, &error);
                Step::Replace(error.status, body)
            }
        }
    }

    /// A provider's error reply without a body, passed on by the upstream
    /// half (the status already the caller's), in the caller's shape.
    fn answer_bodiless_error(&mut self, host: &mut dyn Host) -> Flow {
        let provider = match &self.forward {
            Forward::Chain(chain) => chain.served.as_ref().map(|(p, _)| p.clone()),
            _ => None,
        };
        let status = reply_status(self.answer.status);
        let reply = ErrorReply {
            status,
            body: b"",
            error_type: None,
            via_upstream: true,
            provider: provider.as_deref(),
            secrets: &[],
        };
        let body = exchange::translate_error(self.req.caller, None, &reply);
        let body = bodiless(self.req.caller, status, body);
        self.replace_answer(host, status, &body)
    }

    /// Replaces an answer whose headers this filter still holds with a
    /// reply of its own. Envoy sends it to the caller at once and drops
    /// the rest of the provider's answer. What the caller needs of the
    /// held headers stays.
    pub(super) fn replace_answer(&mut self, host: &mut dyn Host, status: u16, body: &[u8]) -> Flow {
        let mut kept = self.answer.kept_headers(host, true);
        kept.extend(self.req.answer_headers.iter().cloned());
        // Counted as the forwarded call it was, before `reply` marks it answered.
        self.req.status = status;
        self.finish(host);
        let extra: Vec<(&str, &str)> = kept.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        self.reply(host, status, &extra, body)
    }
}

/// Replaces one chunk of a provider stream with its translation: every
/// event the chunk completes goes out now, partial ones wait.
fn translate_stream_chunk(
    host: &mut dyn Host,
    translator: &mut dyn StreamTranslator,
    body_size: usize,
    end_of_stream: bool,
) -> Flow {
    let chunk = match host.response_body(body_size) {
        Ok(c) => c,
        Err(e) => {
            log::warn!("could not read a stream chunk: {e}");
            Vec::new()
        }
    };
    let mut out = Vec::with_capacity(chunk.len() + 64);
    translator.push(&chunk, &mut out);
    if end_of_stream {
        translator.finish(&mut out);
    }
    if let Err(e) = host.replace_response_body(body_size, &out) {
        log::warn!("could not rewrite a stream chunk: {e}");
    }
    Flow::Continue
}
