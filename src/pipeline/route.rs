//! Route stage, listener half: reads the call (`model` and `stream`, see
//! `request.rs`), resolves aliases, applies a budget's downgrade and
//! orders the targets that may serve.

use std::rc::Rc;

use super::flow::internal;
use super::request::{model_not_found, read_call};
use super::state::{RequestState, Routed, Router};
use crate::access::namespace_policy::Source;
use crate::config::models::{Operation, Passed};
use crate::config::routing::RoutePolicy;
use crate::config::Config;
use crate::core::api_error::ApiError;
use crate::core::json::TopLevel;
use crate::core::schema::Schema;
use crate::host::Host;
use crate::metrics;
use crate::providers::ProviderKind;
use crate::quota::admission;
use crate::routing::health::{self, HealthPolicy};
use crate::routing::route;

/// A caller's own fallback chain: model names, comma-separated.
pub const MODELS_REQUEST_HEADER: &str = "x-meshllm-models";
/// Says which model a budget rule switched the request to, and why.
pub const DOWNGRADE_RESPONSE_HEADER: &str = "x-meshllm-downgrade";

/// What routing decisions read from the request.
#[derive(Clone, Copy)]
struct Request<'a> {
    host: &'a dyn Host,
    body: &'a [u8],
    stream: bool,
    /// The body as a JSON value, parsed the first time a route needs it.
    parsed: &'a std::cell::OnceCell<serde_json::Value>,
}

impl Router {
    /// The route stage: the call read, aliases resolved, the namespace
    /// policy applied, a budget's downgrade, the targets ordered.
    pub(super) fn route(
        &mut self,
        host: &mut dyn Host,
        body: &[u8],
        doc: &TopLevel,
    ) -> Result<Routed, ApiError> {
        let op = self.req.operation.unwrap_or(Operation::ChatCompletions);
        let call = read_call(
            (body, doc),
            op,
            self.req.caller,
            self.req.gemini_call.as_ref(),
        )?;
        self.req.streaming = call.stream;
        let config = Rc::clone(&self.config);
        let applied = self.req.applied.clone();
        // A namespace alias is the name it stands for from here on:
        // routing, quota matches, downgrades and metric labels.
        let asked = applied.resolve(&call.model).to_string();
        let known = config.target(&asked).is_some();
        self.req.request_model = Some(if known {
            asked.clone()
        } else {
            metrics::OTHER.into()
        });
        if applied.refuses(&config, &asked) {
            return Err(not_allowed(&self.req, &call.model));
        }
        // A budget past its threshold may send this model elsewhere,
        // but never to one the caller may not use.
        let mut model = asked;
        let allowed = |name: &str| !applied.refuses(&config, name);
        if let Some((to, rule)) = admission::downgrade(
            &config,
            &*host,
            &self.req.who,
            &model,
            applied.rules(),
            &allowed,
        ) {
            self.req.answer_headers.push((
                DOWNGRADE_RESPONSE_HEADER.into(),
                format!("{model}->{to};limit={rule}"),
            ));
            model = to;
        }
        // Named in metrics even when it turns out unusable.
        self.req.route = first_target(&config, &model);
        let parsed = std::cell::OnceCell::new();
        let request = Request {
            host: &*host,
            body,
            stream: call.stream,
            parsed: &parsed,
        };
        let (candidates, reason, routes) = choose_targets(&config, &self.req, request, &model, op)?;
        self.req.reason = Some(reason.clone());
        Ok(Routed {
            max_output: max_output_tokens(doc, self.req.caller, op),
            call,
            candidates,
            reason,
            routes,
        })
    }
}

/// The targets that may serve `model`, in attempt order (quotas may
/// drop some, and the chain is cut to `max_attempts` after them), why,
/// and the routes the request names (quota rules on routes bind them).
fn choose_targets(
    config: &Config,
    req: &RequestState,
    request: Request,
    model: &str,
    op: Operation,
) -> Result<(Vec<usize>, String, Vec<usize>), ApiError> {
    let (mut chain, mut reason) = expand(config, req, model, request)?;
    let mut routes: Vec<usize> = config.routing_index(model).into_iter().collect();
    // Only a listener half that may hand chains keeps the caller's own.
    if let Some(extra) = req.extra_models.as_deref() {
        for name in extra.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let (more, _) = expand(config, req, name, request)?;
            routes.extend(config.routing_index(req.applied.resolve(name)));
            for m in more {
                if !chain.contains(&m) {
                    chain.push(m);
                }
            }
        }
        reason = format!("request;{reason}");
    }
    let first = chain.first().copied();
    chain.retain(|&m| {
        let route = &config.models[m];
        !config.providers[route.provider].key_missing && route.path(op, false).is_some()
    });
    if req.caller == Schema::Responses {
        keep_openai_when_needed(config, &mut chain, request);
    }
    if chain.is_empty() {
        // Explain why the first choice cannot serve.
        if let Some(m) = first {
            return Err(unusable(config, m, op, model));
        }
        return Err(model_not_found(model));
    }
    Ok((chain, reason, routes))
}

/// A Responses request that needs OpenAI (a stored conversation, a
/// built-in tool, ...) keeps only the targets that serve Responses as
/// themselves, when the chain has any; with none, the first target's
/// translator refuses it by name.
fn keep_openai_when_needed(config: &Config, chain: &mut Vec<usize>, request: Request) {
    let native = |m: &usize| config.models[*m].responses_path.is_some();
    let mixed = chain.iter().any(native) && !chain.iter().all(native);
    if !mixed {
        return;
    }
    let body = request
        .parsed
        .get_or_init(|| serde_json::from_slice(request.body).unwrap_or_default());
    if crate::translate::inbound::responses::needs_openai(body) {
        chain.retain(native);
    }
}

/// The configured first target of a model or route name, to name the
/// request in metrics before (or without) a decision.
fn first_target(config: &Config, name: &str) -> Option<usize> {
    config.route_index(name).or_else(|| {
        let policy = &config.routes[config.routing_index(name)?];
        policy.targets.first().map(|t| t.model)
    })
}

/// A model name or route name as targets in order, and why.
fn expand(
    config: &Config,
    req: &RequestState,
    name: &str,
    request: Request,
) -> Result<(Vec<usize>, String), ApiError> {
    // The caller's own fallbacks pass the same policy as its model.
    if req.applied.refuses(config, name) {
        return Err(not_allowed(req, name));
    }
    let name = req.applied.resolve(name);
    if let Some(i) = config.route_index(name) {
        return Ok((vec![i], "model".into()));
    }
    let policy = config
        .routing_index(name)
        .map(|r| &config.routes[r])
        .ok_or_else(|| model_not_found(name))?;
    decide(config, req.caller, request, policy)
}

/// Orders a route's targets for this request: capabilities, health,
/// then the route's strategy.
fn decide(
    config: &Config,
    caller: Schema,
    request: Request,
    policy: &RoutePolicy,
) -> Result<(Vec<usize>, String), ApiError> {
    let Request {
        host,
        body,
        stream,
        parsed,
    } = request;
    let now = host.now_unix_millis();
    let health_policy = HealthPolicy::default();
    // Only routes read the body as a whole, and only once per request.
    let value = parsed.get_or_init(|| serde_json::from_slice(body).unwrap_or_default());
    let mut needs = route::needs_from(caller, value, stream);
    needs.regions = policy.regions.clone();
    needs.zero_retention = policy.zero_retention;
    if policy.strategy == route::Strategy::Auto {
        needs.auto_hard = Some(route::classify(&route::prompt_features(caller, value)));
    }
    let candidates: Vec<route::Candidate> = policy
        .targets
        .iter()
        .map(|t| {
            let m = &config.models[t.model];
            let h = health::snapshot(host, &m.name, now, &health_policy);
            route::Candidate {
                id: t.model,
                name: &m.name,
                weight: t.weight,
                input_price: m.attributes.input_price,
                output_price: m.attributes.output_price,
                quality: m.attributes.quality,
                caps: m.attributes.caps.clone(),
                latency: h.latency_ms.map(|latency_ms| route::LatencyStats {
                    latency_ms,
                    ttft_ms: h.ttft_ms,
                    samples: h.samples,
                }),
                available: h.available,
                tier: t.tier,
            }
        })
        .collect();
    match route::decide(&policy.strategy, &candidates, &needs, next_roll(now)) {
        Ok(decision) => Ok((decision.order, decision.reason)),
        Err(e @ route::NoTarget::Unsupported(_)) => Err(ApiError::invalid_request(
            Some("no_capable_model"),
            format!(
                "The model `{}` cannot serve this request: {e}.",
                policy.name
            ),
        )
        .with_param("model")),
        Err(e) => Err(internal(format!("route {:?}: {e}", policy.name))),
    }
}

/// A well-mixed number per request for weighted choices (splitmix64 over
/// the clock and a per-VM counter).
fn next_roll(now_ms: u64) -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut z = now_ms
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(n.wrapping_mul(0xBF58_476D_1CE4_E5B9));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A known name the caller's policy does not allow: 403.
fn not_allowed(req: &RequestState, name: &str) -> ApiError {
    let by = match req.applied.source {
        Source::Mesh => "the mesh policy",
        Source::Namespace => "its namespace's policy",
        Source::Listener => "its namespace's policy (from this proxy's listener metadata)",
    };
    ApiError::new(
        403,
        "invalid_request_error",
        Some("model_not_allowed"),
        format!(
            "The model `{name}` is not allowed for caller {} by {by}. \
             GET /v1/models lists the models this caller may use.",
            req.who.label()
        ),
    )
    .with_param("model")
}

/// Why target `m` cannot serve this request.
pub(super) fn unusable(config: &Config, m: usize, op: Operation, model: &str) -> ApiError {
    let route = &config.models[m];
    let provider = &config.providers[route.provider];
    if provider.key_missing {
        let variable = match (&provider.api_key_env, provider.kind) {
            (Some(var), _) => var.clone(),
            (None, ProviderKind::Bedrock) => "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY".into(),
            (None, _) => String::new(),
        };
        return ApiError::new(
            500,
            "server_error",
            Some("provider_key_missing"),
            format!(
                "The gateway has no credentials for provider {:?}: the proxy's environment \
                 variable {variable} is not set.",
                provider.name,
            ),
        );
    }
    let what = match op {
        Operation::Embeddings => "embeddings API",
        Operation::ChatCompletions => "chat API",
        Operation::Passed(p) => p.describe(),
        Operation::Account(_) => "API for stored objects",
    };
    ApiError::invalid_request(
        Some("unsupported_operation"),
        format!(
            "The model `{model}` is served by provider {:?}, which has no {what}.",
            provider.name
        ),
    )
    .with_param("model")
}

/// The most output tokens the request asks for, in its caller's terms.
fn max_output_tokens(doc: &TopLevel, caller: Schema, op: Operation) -> Option<u64> {
    match op {
        Operation::ChatCompletions => {}
        Operation::Passed(Passed::Completions) => {}
        // No tokens written: embeddings, images, audio, moderations.
        _ => return Some(0),
    }
    let number = |name: &str| {
        let f = doc.get(name).ok()??;
        std::str::from_utf8(doc.raw(f)).ok()?.parse::<u64>().ok()
    };
    match caller {
        Schema::Gemini => {
            let f = doc.get("generationConfig").ok()??;
            let v: serde_json::Value = serde_json::from_slice(doc.raw(f)).ok()?;
            v.get("maxOutputTokens")?.as_u64()
        }
        Schema::Anthropic => number("max_tokens"),
        Schema::Responses => number("max_output_tokens"),
        Schema::OpenAi | Schema::Converse => {
            number("max_completion_tokens").or_else(|| number("max_tokens"))
        }
    }
}
