//! Finish, listener half, once per request as soon as the answer is
//! complete (so access logs see the fields) or when the request is
//! abandoned: counts it, settles its reservation
//! (`quota/admission.rs`), records what it cost in metrics and in
//! access-log fields. The filter's own replies end the request here too.

use std::rc::Rc;

use super::cache::{cache_settle, LOG_CACHE};
use super::flow::Flow;
use super::state::{CacheUse, Forward, Phase, RequestState, Router};
use crate::config::Config;
use crate::core::api_error::ApiError;
use crate::core::usage::Usage;
use crate::host::Host;
use crate::metrics;
use crate::pipeline::handoff;
use crate::quota::admission;
use crate::translate::exchange;

/// Access-log fields (filter state, read with `%FILTER_STATE(name:PLAIN)%`).
pub const LOG_CALLER: &str = "meshllm.caller";
pub const LOG_TAGS: &str = "meshllm.tags";
pub const LOG_PROVIDER: &str = "meshllm.provider";
pub const LOG_REQUEST_MODEL: &str = "meshllm.request_model";
pub const LOG_RESPONSE_MODEL: &str = "meshllm.response_model";
pub const LOG_ATTEMPTS: &str = "meshllm.attempts";
pub const LOG_ROUTE_REASON: &str = "meshllm.route_reason";
pub const LOG_INPUT_TOKENS: &str = "meshllm.input_tokens";
pub const LOG_OUTPUT_TOKENS: &str = "meshllm.output_tokens";
pub const LOG_CACHED_TOKENS: &str = "meshllm.cached_tokens";
pub const LOG_TOKENS_ESTIMATED: &str = "meshllm.tokens_estimated";
pub const LOG_COST: &str = "meshllm.cost_micro_usd";
pub const LOG_TTFT: &str = "meshllm.ttft_ms";
pub const LOG_QUOTA: &str = "meshllm.quota";
pub const LOG_POLICY: &str = "meshllm.policy";
/// Guardrail decisions: `rule:action:side:found`, comma-separated.
pub const LOG_GUARDRAILS: &str = "meshllm.guardrails";
/// The caller's path, kept before the request is pointed at a provider:
/// Envoy's `:path` is the provider's from then on.
pub const LOG_PATH: &str = "meshllm.path";

/// What `finish` learned that the access log shows.
struct LogFields<'a> {
    provider: &'a str,
    response_model: &'a str,
    attempts: u32,
    ttft_us: Option<u64>,
    /// The response cache's part (`cache.rs`).
    cache: Option<String>,
}

/// The path the caller asked for, for the access log.
pub(super) fn keep_caller_path(host: &mut dyn Host, path: &str) {
    if let Err(e) = host.set_property(&[LOG_PATH], path.as_bytes()) {
        log::debug!("could not set access-log field {LOG_PATH}: {e}");
    }
}

impl Router {
    pub(super) fn finish(&mut self, host: &mut dyn Host) {
        if self.req.finished || self.phase == Phase::Bypass {
            return;
        }
        self.drain_stream_guard(host);
        self.req.finished = true;
        let alone = self.serves_alone();
        let config = Rc::clone(&self.config);
        let route = self.req.route;
        let cache_use = std::mem::replace(&mut self.req.cache, CacheUse::Off);
        let hit = matches!(cache_use, CacheUse::Hit { .. });
        // The target that answered: the upstream half says so with its
        // usage; otherwise the provider and model it named.
        let (served, reported, chain_attempts) = match &mut self.forward {
            Forward::Chain(chain) => (
                chain.served.take(),
                handoff::usage(host).filter(|(t, _)| *t < config.models.len()),
                chain.attempts,
            ),
            Forward::Inline(attempt) => (None, route.zip(attempt.final_usage()), 0),
            Forward::Not => match &cache_use {
                CacheUse::Hit {
                    provider, model, ..
                } => (Some((provider.clone(), model.clone())), None, 0),
                _ => (None, None, 0),
            },
        };
        let served_index = match (&reported, &served, &self.forward) {
            (Some((t, _)), _, _) => Some(*t),
            (None, Some((p, upstream)), Forward::Chain(chain)) => {
                chain.plan.chain.iter().copied().find(|&m| {
                    let r = &config.models[m];
                    r.upstream_model == *upstream && config.providers[r.provider].name == *p
                })
            }
            (None, None, _) if alone => route,
            _ => None,
        };
        let first = route.map(|i| &config.models[i]);
        // The provider that answered (or was to), and the model it ran.
        let provider = match (&served, served_index.or(route)) {
            (Some((p, _)), _) => p.as_str(),
            (None, Some(m)) => config.providers[config.models[m].provider].name.as_str(),
            (None, None) => self
                .req
                .account_provider
                .and_then(|p| config.providers.get(p))
                .map_or("none", |p| p.name.as_str()),
        };
        let response_model = match (&served, served_index) {
            (Some((_, m)), _) => m.as_str(),
            (None, Some(m)) => config.models[m].upstream_model.as_str(),
            (None, None) => "none",
        };
        let Some(op) = self.req.operation else {
            // Listings and unknown URLs are not LLM calls.
            return;
        };
        let (ns, svc) = self.req.who.names();
        let operation = op.name();
        let request_model = self.req.request_model.as_deref().unwrap_or("none");
        let labels =
            metrics::call_labels(ns, svc, operation, provider, request_model, response_model);
        let req = &self.req;
        let cache = cache_settle(
            cache_use,
            &config,
            req,
            host,
            &labels,
            provider,
            response_model,
        );
        let now = host.now_unix_micros();
        let error = metrics::error_type(req.status);
        let error_label: &[(&str, &str)] = match &error {
            Some(e) => &[("error_type", e.as_str())],
            None => &[],
        };
        host.count_labelled(metrics::REQUESTS_TOTAL, &labels, error_label, 1);
        host.histogram_labelled(
            metrics::REQUEST_DURATION,
            &labels,
            error_label,
            metrics::millis(now.saturating_sub(req.started_us)),
        );
        if let (Some(reason), Some(first)) = (&req.reason, first) {
            let first_provider = &config.providers[first.provider].name;
            // Usually the first target answered: its labels are built.
            let first_labels;
            let route_labels =
                if first_provider == provider && first.upstream_model == response_model {
                    &labels
                } else {
                    first_labels = metrics::call_labels(
                        ns,
                        svc,
                        operation,
                        first_provider,
                        request_model,
                        &first.upstream_model,
                    );
                    &first_labels
                };
            host.count_labelled(
                metrics::ROUTE_DECISIONS_TOTAL,
                route_labels,
                &[("route_reason", &metrics::route_reason(reason))],
                1,
            );
        }
        let forwarded = self.phase == Phase::Forwarded;
        if let (true, Forward::Inline(attempt)) = (forwarded, &self.forward) {
            // The request was its only attempt; with health, counted as
            // the provider's part ended (none when Envoy never sent it).
            let attempts = metrics::ATTEMPTS_TOTAL;
            match (
                attempt.records_health(),
                attempt.end.map(|e| e.error_type()),
            ) {
                (false, _) => host.count_labelled(attempts, &labels, error_label, 1),
                (true, Some(Some(e))) => {
                    host.count_labelled(attempts, &labels, &[("error_type", &e)], 1)
                }
                (true, Some(None)) => host.count_labelled(attempts, &labels, &[], 1),
                (true, None) => {}
            }
        }
        if !forwarded && self.phase != Phase::Answered {
            // Abandoned while the quota store was asked: local reservations
            // go back; the store's, if it made one, stays counted.
            if let Some(a) = self.req.admission.take() {
                admission::abandon(host, a);
            }
            return;
        }
        let outcome = admission::Outcome {
            // A hit costs no provider tokens; it still counts as a request.
            usage: if hit {
                Some(Usage::default())
            } else {
                reported.map(|(_, u)| u)
            },
            served: served_index,
            // The upstream half numbers the attempt that answered; a lone
            // target is tried once.
            attempts: if alone {
                Some(1)
            } else {
                (chain_attempts > 0).then_some(chain_attempts as usize)
            },
            status: req.status,
            response_bytes: req.response_bytes,
        };
        let charge = admission::charge(&config, req.admission.as_ref(), &outcome);
        if let Some(a) = &req.admission {
            admission::settle(&config, host, &req.who, a, &charge, &outcome);
        }
        // A streamed answer's first byte, and its pace after it.
        let ttft_us = match (req.streaming, req.first_byte_us) {
            (true, Some(at)) if (200..300).contains(&req.status) => {
                let ttft = at.saturating_sub(req.started_us);
                host.histogram_labelled(
                    metrics::TIME_TO_FIRST_TOKEN,
                    &labels,
                    &[],
                    metrics::millis(ttft),
                );
                let out = charge.usage.output_tokens;
                if out > 1 && !charge.estimated {
                    let per_token = now.saturating_sub(at) / (out - 1);
                    host.histogram_labelled(
                        metrics::TIME_PER_OUTPUT_TOKEN,
                        &labels,
                        &[],
                        metrics::millis(per_token),
                    );
                }
                Some(ttft)
            }
            _ => None,
        };
        let fields = LogFields {
            provider,
            response_model,
            attempts: if alone {
                u32::from(forwarded)
            } else {
                chain_attempts
            },
            ttft_us,
            cache,
        };
        account(&config, req, host, &labels, &charge, &fields);
        self.req.admission = None;
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
        self.reply_as(host, status, "application/json", extra, body)
    }

    /// A reply of the filter's own, of this content type.
    pub(super) fn reply_as(
        &mut self,
        host: &mut dyn Host,
        status: u16,
        content_type: &str,
        extra: &[(&str, &str)],
        body: &[u8],
    ) -> Flow {
        // Nothing more will happen to this request: account for it now,
        // while access logs can still see the fields.
        self.req.status = status;
        self.phase = Phase::Answered;
        self.finish(host);
        let mut headers: Vec<(&str, &str)> = Vec::with_capacity(extra.len() + 1);
        headers.push(("content-type", content_type));
        headers.extend_from_slice(extra);
        if let Err(e) = host.send_response(status, &headers, body) {
            log::error!("could not send a local reply: {e}");
        }
        Flow::Pause
    }
}

/// What the request cost, in metrics (by caller, model and the tag values
/// the config names) and in access-log fields.
fn account(
    config: &Config,
    req: &RequestState,
    host: &mut dyn Host,
    labels: &metrics::Labels,
    charge: &admission::Charge,
    fields: &LogFields,
) {
    let mut tag_labels: Vec<(&str, &str)> = config
        .tags
        .iter()
        .enumerate()
        .map(|(i, tag)| {
            let value = req
                .who
                .tags
                .iter()
                .find(|(t, _)| *t == i)
                .map(|(_, v)| v.as_str());
            let shown = match value {
                None => "none",
                Some(v) if tag.metric_values.iter().any(|m| m == v) => v,
                Some(_) => "other",
            };
            (tag.label.as_str(), shown)
        })
        .collect();
    let u = charge.usage;
    if u != Usage::default() {
        for (kind, n) in [
            ("input", u.input_tokens),
            ("output", u.output_tokens),
            ("cached", u.cached_input_tokens),
            ("reasoning", u.reasoning_tokens),
        ] {
            // Input and output always; the others where they happened.
            if n > 0 || matches!(kind, "input" | "output") {
                host.histogram_labelled(
                    metrics::TOKEN_USAGE,
                    labels,
                    &[("gen_ai_token_type", kind)],
                    n,
                );
            }
            tag_labels.push(("gen_ai_token_type", kind));
            host.count_labelled(metrics::TOKENS_TOTAL, labels, &tag_labels, n);
            tag_labels.pop();
        }
        host.count_labelled(metrics::COST_TOTAL, labels, &tag_labels, charge.micro_usd);
    }
    let all_tags: Vec<String> = req
        .who
        .tags
        .iter()
        .filter_map(|(i, v)| Some(format!("{}={v}", config.tags.get(*i)?.name)))
        .collect();
    let requested = req.request_model.as_deref().unwrap_or("-");
    let mut log: Vec<(&str, String)> = vec![
        (LOG_CALLER, req.who.label()),
        (LOG_PROVIDER, fields.provider.to_string()),
        (LOG_REQUEST_MODEL, requested.to_string()),
        (LOG_RESPONSE_MODEL, fields.response_model.to_string()),
        (LOG_ATTEMPTS, fields.attempts.to_string()),
        (LOG_INPUT_TOKENS, u.input_tokens.to_string()),
        (LOG_OUTPUT_TOKENS, u.output_tokens.to_string()),
        (LOG_CACHED_TOKENS, u.cached_input_tokens.to_string()),
        (LOG_COST, charge.micro_usd.to_string()),
        (LOG_QUOTA, req.quota_decision.clone()),
        (LOG_POLICY, req.applied.source.name().to_string()),
    ];
    // Absent fields show as `-` in access logs: not set at all.
    if !all_tags.is_empty() {
        log.push((LOG_TAGS, all_tags.join(",")));
    }
    if let Some(reason) = &req.reason {
        log.push((LOG_ROUTE_REASON, reason.clone()));
    }
    if !req.guard_log.is_empty() {
        log.push((LOG_GUARDRAILS, req.guard_log.join(",")));
    }
    if let Some(cache) = &fields.cache {
        log.push((LOG_CACHE, cache.clone()));
    }
    if let Some(ttft) = fields.ttft_us {
        log.push((LOG_TTFT, metrics::millis(ttft).to_string()));
    }
    if charge.estimated {
        log.push((LOG_TOKENS_ESTIMATED, "true".into()));
    }
    for (name, value) in log {
        if let Err(e) = host.set_property(&[name], value.as_bytes()) {
            log::debug!("could not set access-log field {name}: {e}");
        }
    }
}
