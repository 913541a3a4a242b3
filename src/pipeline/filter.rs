//! The per-request logic of the gateway, written against `Host`.
//!
//! Request side: recognise the OpenAI endpoint, answer `/v1/models` locally,
//! buffer the JSON body of chat/embeddings calls, pick the model's route,
//! rewrite `model` in place and point the request at the provider.
//! Response side: pass successful answers through untouched (streams chunk by
//! chunk) and turn error replies into OpenAI's error shape.

use std::rc::Rc;

use crate::access::namespace_policy::{self, Applied, Source};
use crate::config::models::{ModelRoute, Operation};
use crate::config::providers::Provider;
use crate::config::routing::RoutePolicy;
use crate::config::Config;
use crate::core::api_error::ApiError;
use crate::core::json::{Kind, TopLevel};
use crate::core::schema::Schema;
use crate::core::usage::Usage;
use crate::host::{CalloutAnswer, CalloutId, Host, HostResult};
use crate::metrics;
use crate::pipeline::handoff::{
    self, is_internal_request_header, Plan, ATTEMPTS_RESPONSE_HEADER, CALLER_API_HEADER,
    CLUSTER_HEADER, FAILOVER_CLUSTER, FIRST_POSITION_CLUSTER, MAX_RETRIES_HEADER,
    MODEL_RESPONSE_HEADER, PROVIDER_RESPONSE_HEADER, ROUTER_CONTROL_HEADERS, ROUTE_RESPONSE_HEADER,
};
use crate::providers::aws::sigv4;
use crate::providers::ProviderKind;
use crate::quota::admission::{self, Admission, Ask, Who};
use crate::routing::health::{self, HealthPolicy, Outcome};
use crate::routing::route;
use crate::translate::exchange::{self, ErrorReply, Exchange, Inbound};
use crate::translate::StreamTranslator;

/// Model listings in the Anthropic and Gemini APIs' shapes (OpenAI's is
/// built once with the configuration). Rare requests: built per call.
mod listing {
    use serde_json::{json, Value};

    use crate::core::schema::Schema;

    pub fn entry(caller: Schema, id: &str) -> Value {
        match caller {
            Schema::Gemini => json!({
                "name": format!("models/{id}"),
                "displayName": id,
                "supportedGenerationMethods": ["generateContent", "streamGenerateContent"],
            }),
            _ => json!({
                "type": "model",
                "id": id,
                "display_name": id,
                "created_at": "1970-01-01T00:00:00Z",
            }),
        }
    }

    pub fn model(caller: Schema, id: &str) -> Vec<u8> {
        entry(caller, id).to_string().into_bytes()
    }

    pub fn models<'a>(caller: Schema, names: impl Iterator<Item = &'a str>) -> Vec<u8> {
        let names: Vec<&str> = names.collect();
        let data: Vec<Value> = names.iter().map(|n| entry(caller, n)).collect();
        let body = match caller {
            Schema::Gemini => json!({ "models": data }),
            _ => json!({
                "data": data,
                "has_more": false,
                "first_id": names.first(),
                "last_id": names.last(),
            }),
        };
        body.to_string().into_bytes()
    }
}

/// A caller's own fallback chain: model names, comma-separated.
pub const MODELS_REQUEST_HEADER: &str = "x-meshllm-models";
/// Says which model a budget rule switched the request to, and why.
pub const DOWNGRADE_RESPONSE_HEADER: &str = "x-meshllm-downgrade";
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
/// The caller's path, kept before the request is pointed at a provider:
/// Envoy's `:path` is the provider's from then on.
pub const LOG_PATH: &str = "meshllm.path";
/// Provider rate-limit headers describe the gateway's account with the
/// provider, not the caller's limits: dropped when quotas are configured.
const PROVIDER_RATE_LIMIT_HEADERS: &[&str] = &[
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
/// The upstream connection's local address: absent when none was made.
const UPSTREAM_LOCAL_ADDRESS: &[&str] = &["upstream", "local_address"];
/// Why the upstream connection failed (refused, TLS), when it did.
const UPSTREAM_TRANSPORT_FAILURE: &[&str] = &["upstream", "transport_failure_reason"];
/// Which half of the gateway this filter instance is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// One listener filter does everything for one target (no failover).
    Standalone,
    /// The listener half: validates, picks the targets, hands Envoy the chain.
    Router,
    /// The upstream half: translates one attempt for its target.
    Attempt,
}

/// Client headers that carry credentials or account selection; a provider
/// must never see them (the gateway's own key is used instead).
const CLIENT_CREDENTIAL_HEADERS: &[&str] = &[
    "authorization",
    "x-api-key",
    "api-key",
    "x-goog-api-key",
    "openai-organization",
    "openai-project",
    "x-amz-security-token",
];

/// Which of many request headers are present, from one listing of the map
/// instead of a host call per name. The listing may name headers removed
/// since (removing one again is a harmless no-op); when it failed, each
/// name is asked for on its own.
struct RequestHeaders(Option<Vec<String>>);

impl RequestHeaders {
    fn list(host: &dyn Host) -> Self {
        RequestHeaders(host.request_header_names().ok())
    }

    fn has(&self, host: &dyn Host, name: &str) -> bool {
        match &self.0 {
            Some(names) => names.iter().any(|n| n.eq_ignore_ascii_case(name)),
            None => host.request_header(name).is_some(),
        }
    }
}

/// Anthropic API options a caller sends; they only mean something to Anthropic.
const ANTHROPIC_HEADERS: &[&str] = &["anthropic-version", "anthropic-beta"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Pause,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing decided yet.
    Start,
    /// Buffering the request body of an LLM call.
    ReadingBody,
    /// Sent to a provider.
    Forwarded,
    /// Answered by the filter itself.
    Answered,
    /// Not for a host the filter handles: passed through untouched.
    Bypass,
}

pub struct RequestFilter {
    config: Rc<Config>,
    role: Role,
    phase: Phase,
    /// Router and attempt roles: the chosen chain and why.
    plan: Option<Plan>,
    /// Router role: the provider and model that answered, as reported.
    served: Option<(String, String)>,
    /// Attempt role: which attempt of the request this is (1-based);
    /// router role: how many attempts the answer took.
    attempt: u32,
    /// When the request (listener roles) or the attempt started, in µs.
    started_us: u64,
    /// Listener roles: when the answer's first byte passed, in µs.
    first_byte_us: Option<u64>,
    /// Attempt role: whether its outcome reached the target's health
    /// record (and the attempt metrics) yet.
    outcome_recorded: bool,
    /// Serving roles with health: how the attempt at the provider ended.
    attempt_end: Option<AttemptEnd>,
    /// Router role with a single target: this half serves the request as the
    /// standalone role does and sends it to the first position's cluster,
    /// where the upstream half does not run (no later attempt can need it).
    direct: bool,
    /// The caller asked for a streamed answer.
    streaming: bool,
    /// Router role: the caller's own fallbacks (`x-meshllm-models`), taken
    /// off the request at the entrance with every other internal header.
    extra_models: Option<String>,
    /// Listener roles: the request's header names as listed at the
    /// entrance, reused where client headers are removed later.
    entry_headers: Option<Vec<String>>,
    /// Listener roles: the model the caller asked for, as a metric label
    /// (a name the config does not know is `_OTHER`), and why the first
    /// target was chosen.
    request_model: Option<String>,
    reason: Option<String>,
    /// The API the caller speaks; errors go back in its shape.
    caller: Schema,
    operation: Option<Operation>,
    /// Gemini callers name the model and streaming in the URL.
    gemini_call: Option<(String, bool)>,
    route: Option<usize>,
    status: u16,
    exchange: Option<Exchange>,
    response: ResponseMode,
    /// Listener roles: who called and what the request reserved.
    who: Who,
    /// Listener roles: the namespace policy in force (mesh, document
    /// namespace entry or listener metadata).
    applied: Applied,
    admission: Option<Admission>,
    /// Listener roles: headers for the caller's answer (rate limits,
    /// budget alerts, downgrades) and for a refusal.
    answer_headers: Vec<(String, String)>,
    /// Listener roles: answer bytes passed to the caller.
    response_bytes: u64,
    /// Listener roles: `admitted`, `rejected:<limit>:<reason>` or `none`.
    quota_decision: String,
    /// Serving roles: the token counts the provider reported.
    usage: Option<Usage>,
    /// Listener roles: the request was counted and settled.
    finished: bool,
    /// Listener roles: paused until the shared quota store answers.
    awaiting_store: Option<AwaitingStore>,
}

/// What routing decisions read from the request.
#[derive(Clone, Copy)]
struct Request<'a> {
    host: &'a dyn Host,
    body: &'a [u8],
    stream: bool,
    /// The body as a JSON value, parsed the first time a route needs it.
    parsed: &'a std::cell::OnceCell<serde_json::Value>,
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

/// A request paused at admission until the shared quota store answers:
/// what it needs to go on (shared quotas, issue 21).
struct AwaitingStore {
    body: Vec<u8>,
    op: Operation,
    call: Call,
    chain: Vec<usize>,
    reason: String,
}

/// The model and streaming choice read from a call's body (or URL).
struct Call {
    model: String,
    model_span: Option<std::ops::Range<usize>>,
    stream: bool,
}

/// What the response side does with the provider's answer.
enum ResponseMode {
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
    /// Router role: hold a complete answer of a chain until its end, so the
    /// upstream half can still change its status (`handoff::answer_status`).
    Hold,
    /// Translate a stream event by event.
    Stream(Box<dyn StreamTranslator>),
    /// Forward a complete answer untouched, keeping a copy to read its usage.
    Watch(Vec<u8>),
}

enum Endpoint {
    Models,
    Model(String),
    Call(Operation, Schema),
    /// `models/{model}:generateContent` or `:streamGenerateContent`.
    Gemini(String, bool),
}

fn match_endpoint(path: &str) -> Option<(Endpoint, &'static str)> {
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    let path = path.strip_suffix('/').unwrap_or(path);
    match path {
        "/v1/chat/completions" => Some((
            Endpoint::Call(Operation::ChatCompletions, Schema::OpenAi),
            "POST",
        )),
        "/v1/embeddings" => Some((
            Endpoint::Call(Operation::Embeddings, Schema::OpenAi),
            "POST",
        )),
        "/v1/messages" => Some((
            Endpoint::Call(Operation::ChatCompletions, Schema::Anthropic),
            "POST",
        )),
        "/v1/models" | "/v1beta/models" => Some((Endpoint::Models, "GET")),
        _ => {
            let rest = path
                .strip_prefix("/v1beta/models/")
                .or_else(|| path.strip_prefix("/v1/models/"))?;
            let gemini = rest
                .rsplit_once(':')
                .and_then(|(model, method)| match method {
                    "generateContent" => Some((model, false)),
                    "streamGenerateContent" => Some((model, true)),
                    _ => None,
                });
            if let Some((model, stream)) = gemini {
                let model = percent_decode(model)?;
                return (!model.is_empty()).then_some((Endpoint::Gemini(model, stream), "POST"));
            }
            if path.starts_with("/v1beta/") {
                let id = percent_decode(rest)?;
                return (!id.is_empty() && !id.contains(':'))
                    .then_some((Endpoint::Model(id), "GET"));
            }
            let id = percent_decode(rest)?;
            (!id.is_empty()).then_some((Endpoint::Model(id), "GET"))
        }
    }
}

/// The caller's API as far as the URL tells, for errors raised before the
/// endpoint is known.
fn caller_of_path(path: &str) -> Schema {
    if path.starts_with("/v1beta/")
        || path.contains(":generateContent")
        || path.contains(":streamGenerateContent")
    {
        Schema::Gemini
    } else if path.starts_with("/v1/messages") {
        Schema::Anthropic
    } else {
        Schema::OpenAi
    }
}

/// The caller's API as `CALLER_API_HEADER` names it (render.py's
/// `local_reply_config` has one set of mappers per name).
fn api_name(caller: Schema) -> &'static str {
    match caller {
        Schema::Anthropic => "anthropic",
        Schema::Gemini => "gemini",
        Schema::OpenAi | Schema::Converse => "openai",
    }
}

/// Decodes `%XX` escapes (SDKs encode the `/` of ids like `org/model`).
/// None when an escape is malformed or the result is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    if !s.contains('%') {
        return Some(s.to_string());
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl RequestFilter {
    pub fn new(config: Rc<Config>, role: Role) -> Self {
        RequestFilter {
            config,
            role,
            phase: Phase::Start,
            plan: None,
            served: None,
            attempt: 0,
            started_us: 0,
            first_byte_us: None,
            outcome_recorded: false,
            attempt_end: None,
            direct: false,
            streaming: false,
            request_model: None,
            extra_models: None,
            entry_headers: None,
            reason: None,
            caller: Schema::OpenAi,
            operation: None,
            gemini_call: None,
            route: None,
            status: 0,
            exchange: None,
            response: ResponseMode::PassThrough,
            who: Who::default(),
            applied: Applied::default(),
            admission: None,
            answer_headers: Vec::new(),
            response_bytes: 0,
            quota_decision: "none".into(),
            usage: None,
            finished: false,
            awaiting_store: None,
        }
    }

    fn route(&self) -> Option<&ModelRoute> {
        self.route.map(|i| &self.config.models[i])
    }

    fn provider(&self) -> Option<&Provider> {
        self.route().map(|r| &self.config.providers[r.provider])
    }

    fn reply(
        &mut self,
        host: &mut dyn Host,
        status: u16,
        extra: &[(&str, &str)],
        body: &[u8],
    ) -> Flow {
        // Nothing more will happen to this request: account for it now,
        // while access logs can still see the fields.
        self.status = status;
        self.phase = Phase::Answered;
        self.finish(host);
        let mut headers: Vec<(&str, &str)> = Vec::with_capacity(extra.len() + 2);
        headers.push(("content-type", "application/json"));
        headers.extend_from_slice(extra);
        // Tells the listener half the body is already in the caller's shape.
        let attempt = self.attempt.to_string();
        if self.role == Role::Attempt {
            headers.push((ATTEMPTS_RESPONSE_HEADER, &attempt));
            if !self.outcome_recorded {
                self.outcome_recorded = true;
                self.count_attempt(host, AttemptEnd::Answered(status));
            }
        }
        if let Err(e) = host.send_response(status, &headers, body) {
            log::error!("could not send a local reply: {e}");
        }
        self.phase = Phase::Answered;
        self.status = status;
        Flow::Pause
    }

    fn reject(&mut self, host: &mut dyn Host, error: ApiError) -> Flow {
        let body = exchange::error_body(self.caller, &error);
        let extra = std::mem::take(&mut self.answer_headers);
        let extra: Vec<(&str, &str)> = extra
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        self.reply(host, error.status, &extra, &body)
    }

    pub fn on_request_headers(&mut self, host: &mut dyn Host, end_of_stream: bool) -> Flow {
        if self.role == Role::Attempt {
            return self.start_attempt(host, end_of_stream);
        }
        self.started_us = host.now_unix_micros();
        // Routing is the filter's decision alone; a client cannot pick a
        // cluster, whether or not its request is one the filter handles.
        if host.request_header(CLUSTER_HEADER).is_some() {
            let _ = host.remove_request_header(CLUSTER_HEADER);
        }
        if !self.config.hosts.is_empty() {
            let authority = host.request_header(":authority").unwrap_or_default();
            if !self.config.handles_host(&authority) {
                self.phase = Phase::Bypass;
                return Flow::Continue;
            }
        }
        let method = host.request_header(":method").unwrap_or_default();
        let path = host.request_header(":path").unwrap_or_default();
        self.caller = caller_of_path(&path);
        let Some((endpoint, allowed)) = match_endpoint(&path) else {
            let shown = path.split_once('?').map_or(path.as_str(), |(p, _)| p);
            return self.reject(
                host,
                ApiError::new(
                    404,
                    "invalid_request_error",
                    Some("unknown_url"),
                    format!(
                        "Unknown request URL: {method} {shown}. This gateway serves \
                         POST /v1/chat/completions, POST /v1/embeddings, GET /v1/models, \
                         POST /v1/messages and POST /v1beta/models/{{model}}:generateContent \
                         (and :streamGenerateContent)."
                    ),
                ),
            );
        };
        if method != allowed {
            let error = ApiError::new(
                405,
                "invalid_request_error",
                Some("method_not_allowed"),
                format!("Method {method} is not allowed on this URL; use {allowed}."),
            );
            let body = exchange::error_body(self.caller, &error);
            return self.reply(host, 405, &[("allow", allowed)], &body);
        }
        // The Anthropic SDK lists models on the same URL as OpenAI's, and
        // says who it is with `anthropic-version`.
        if matches!(endpoint, Endpoint::Models | Endpoint::Model(_))
            && host.request_header("anthropic-version").is_some()
        {
            self.caller = Schema::Anthropic;
        }
        match endpoint {
            Endpoint::Models => {
                let config = Rc::clone(&self.config);
                let applied = match self.listing_policy(host) {
                    Ok(a) => a,
                    Err(e) => return self.reject(host, e),
                };
                if let Some(applied) = applied.filter(|a| a.restricts(&config)) {
                    let visible = applied.visible(&config);
                    let body = match self.caller {
                        Schema::OpenAi | Schema::Converse => {
                            crate::config::models::models_list_body(
                                visible.iter().map(|(n, t)| (*n, config.owner(*t))),
                            )
                        }
                        caller => listing::models(caller, visible.iter().map(|(n, _)| *n)),
                    };
                    return self.reply(host, 200, &[], &body);
                }
                match self.caller {
                    Schema::OpenAi | Schema::Converse => {
                        self.reply(host, 200, &[], &config.models_list_body)
                    }
                    caller => {
                        let body = listing::models(caller, config.public_names());
                        self.reply(host, 200, &[], &body)
                    }
                }
            }
            Endpoint::Model(id) => {
                let config = Rc::clone(&self.config);
                let id = match self.caller {
                    Schema::Gemini => id.strip_prefix("models/").unwrap_or(&id).to_string(),
                    _ => id,
                };
                let applied = match self.listing_policy(host) {
                    Ok(a) => a,
                    Err(e) => return self.reject(host, e),
                };
                if let Some(applied) = applied.filter(|a| a.restricts(&config)) {
                    // A name the caller may not use is not shown, as if unknown.
                    let body = match applied.target(&config, &id) {
                        Some(t) if applied.allows(&config, t) => match self.caller {
                            Schema::OpenAi | Schema::Converse => {
                                crate::config::models::model_body(&id, config.owner(t))
                            }
                            caller => listing::model(caller, &id),
                        },
                        _ => return self.reject(host, model_not_found(&id)),
                    };
                    return self.reply(host, 200, &[], &body);
                }
                match (config.model_body(&id), self.caller) {
                    (None, _) => self.reject(host, model_not_found(&id)),
                    (Some(body), Schema::OpenAi | Schema::Converse) => {
                        self.reply(host, 200, &[], body)
                    }
                    (Some(_), caller) => {
                        let body = listing::model(caller, &id);
                        self.reply(host, 200, &[], &body)
                    }
                }
            }
            Endpoint::Call(op, caller) => {
                self.caller = caller;
                // An LLM call from here on: refusals are counted too.
                self.operation = Some(op);
                if let Err(e) = self.identify(host) {
                    return self.reject(host, e);
                }
                if let Err(e) = self.strip_internal_headers(host) {
                    return self.reject(host, e);
                }
                self.start_call(host, op, end_of_stream)
            }
            Endpoint::Gemini(model, stream) => {
                self.caller = Schema::Gemini;
                let query = path.split_once('?').map_or("", |(_, q)| q);
                if stream && !query.split('&').any(|p| p == "alt=sse") {
                    // Google's other streaming form is one JSON array; the
                    // gateway streams events, as every SDK asks for.
                    return self.reject(
                        host,
                        ApiError::invalid_request(
                            Some("unsupported_parameter"),
                            "This gateway streams Gemini answers as server-sent events only: \
                             add ?alt=sse to :streamGenerateContent."
                                .into(),
                        ),
                    );
                }
                self.gemini_call = Some((model, stream));
                self.operation = Some(Operation::ChatCompletions);
                if let Err(e) = self.identify(host) {
                    return self.reject(host, e);
                }
                if let Err(e) = self.strip_internal_headers(host) {
                    return self.reject(host, e);
                }
                self.start_call(host, Operation::ChatCompletions, end_of_stream)
            }
        }
    }

    /// Attempt role: finds this attempt's target from the plan and the host
    /// Envoy picked, and clears what an earlier attempt set.
    fn start_attempt(&mut self, host: &mut dyn Host, end_of_stream: bool) -> Flow {
        let Some(plan) = handoff::plan(host) else {
            // Another service's request on a router this half also serves.
            let authority = host.request_header(":authority").unwrap_or_default();
            if !self.config.hosts.is_empty() && !self.config.handles_host(&authority) {
                self.phase = Phase::Bypass;
                return Flow::Continue;
            }
            return self.reject(
                host,
                internal(
                    "no routing plan reached the upstream filter; the meshllm listener \
                     filter must run on this route"
                        .into(),
                ),
            );
        };
        self.caller = plan.caller;
        self.gemini_call = plan.gemini.clone();
        self.attempt = host
            .request_header("x-envoy-attempt-count")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1);
        let position = handoff::attempt_position(host);
        let Some(&target) = position.and_then(|p| plan.chain.get(p)) else {
            return self.reject(
                host,
                internal(format!(
                    "attempt {} reached an upstream host outside the plan (position {position:?})",
                    self.attempt
                )),
            );
        };
        self.route = Some(target);
        self.started_us = host.now_unix_micros();
        if let Some(&previous) = position.and_then(|p| plan.chain.get(p.checked_sub(1)?)) {
            let config = &self.config;
            let from = &config.providers[config.models[previous].provider].name;
            let name = attempt_labels(config, &plan, target)
                .name(metrics::FALLBACKS_TOTAL, &[("fallback_from", from)]);
            host.count(&name, 1);
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
            return self.reject(
                host,
                internal(format!("could not reset the request headers: {e}")),
            );
        }
        let op = if plan.embeddings {
            Operation::Embeddings
        } else {
            Operation::ChatCompletions
        };
        self.plan = Some(plan);
        self.start_call(host, op, end_of_stream)
    }

    /// Listener roles: names the caller before its credentials are stripped,
    /// and finds the namespace policy that applies to it.
    fn identify(&mut self, host: &mut dyn Host) -> Result<(), ApiError> {
        let config = Rc::clone(&self.config);
        self.who = admission::identify(&config, host)?;
        let listener = host.property(namespace_policy::LISTENER_POLICY_PATH);
        let from_listener = listener.is_some();
        match namespace_policy::apply(&config, host, self.who.caller.as_ref(), listener) {
            Ok(applied) => self.applied = applied,
            Err(e) => {
                if from_listener {
                    self.applied.source = Source::Listener;
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Model listings: the policy of the caller, when any policy could
    /// restrict what it sees (None: the document's full list). A caller that
    /// cannot be identified sees the mesh's list.
    fn listing_policy(&mut self, host: &mut dyn Host) -> Result<Option<Applied>, ApiError> {
        let config = Rc::clone(&self.config);
        let listener = host.property(namespace_policy::LISTENER_POLICY_PATH);
        if listener.is_none() && config.allowed_models.is_none() && config.namespaces.is_empty() {
            return Ok(None);
        }
        let caller = admission::identify(&config, host)
            .ok()
            .and_then(|who| who.caller);
        namespace_policy::apply(&config, host, caller.as_ref(), listener).map(Some)
    }

    /// Listener roles: a client may not steer Envoy's router (`x-envoy-*`:
    /// retries, timeouts, ...) nor speak for the gateway's halves
    /// (`x-meshllm-*`: positions, cluster, plan): such headers would pick
    /// another target, send a request twice, or have Envoy's own refusals
    /// counted against a target's health. All are removed here, once; the
    /// caller's `x-meshllm-models` is kept aside for routing.
    fn strip_internal_headers(&mut self, host: &mut dyn Host) -> Result<(), ApiError> {
        // Without a listing, every name Envoy's router or the gateway reads.
        let (names, listed) = match host.request_header_names() {
            Ok(names) => (names, true),
            Err(_) => {
                let positions =
                    (0..self.config.failover.max_attempts).map(handoff::position_header);
                let present = ROUTER_CONTROL_HEADERS
                    .iter()
                    .chain([CLUSTER_HEADER, MODELS_REQUEST_HEADER].iter())
                    .map(|n| n.to_string())
                    .chain(positions)
                    .filter(|n| host.request_header(n).is_some())
                    .collect();
                (present, false)
            }
        };
        for name in names.iter().filter(|n| is_internal_request_header(n)) {
            if name.eq_ignore_ascii_case(MODELS_REQUEST_HEADER) && self.role == Role::Router {
                self.extra_models = host.request_header(name);
            }
            host.remove_request_header(name).map_err(|e| {
                internal(format!("could not remove the request header {name}: {e}"))
            })?;
        }
        if listed {
            self.entry_headers = Some(names);
        }
        Ok(())
    }

    /// The client's request headers: the entrance's listing when there was
    /// one (the filter adds no header it later looks for, and removing a
    /// name removed since is a no-op), else a fresh one.
    fn client_headers(&mut self, host: &dyn Host) -> RequestHeaders {
        match self.entry_headers.take() {
            Some(names) => RequestHeaders(Some(names)),
            None => RequestHeaders::list(host),
        }
    }

    fn start_call(&mut self, host: &mut dyn Host, op: Operation, end_of_stream: bool) -> Flow {
        self.operation = Some(op);
        if end_of_stream {
            return self.reject(
                host,
                ApiError::invalid_request(
                    Some("missing_body"),
                    "The request has no body; send a JSON object.".into(),
                ),
            );
        }
        self.phase = Phase::ReadingBody;
        Flow::Pause
    }

    pub fn on_request_body(
        &mut self,
        host: &mut dyn Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Flow {
        if self.phase != Phase::ReadingBody {
            return Flow::Continue;
        }
        let limit = self.config.max_request_bytes;
        if body_size > limit {
            return self.reject(
                host,
                ApiError::new(
                    413,
                    "invalid_request_error",
                    Some("request_too_large"),
                    format!(
                        "The request body is larger than this gateway's limit of {limit} bytes."
                    ),
                ),
            );
        }
        if !end_of_stream {
            return Flow::Pause;
        }
        self.finish_request(host, body_size)
    }

    /// Trailers end a request whose last body chunk was not marked final.
    pub fn on_request_trailers(&mut self, host: &mut dyn Host, body_size: usize) -> Flow {
        if self.phase != Phase::ReadingBody {
            return Flow::Continue;
        }
        self.finish_request(host, body_size)
    }

    fn finish_request(&mut self, host: &mut dyn Host, body_size: usize) -> Flow {
        let body = match host.request_body(body_size) {
            Ok(b) => b,
            Err(e) => {
                return self.reject(
                    host,
                    internal(format!("could not read the request body: {e}")),
                )
            }
        };
        if self.role != Role::Attempt {
            keep_caller_path(host);
        }
        match self.route_request(host, &body) {
            Ok(()) if self.awaiting_store.is_some() => Flow::Pause,
            Ok(()) => {
                self.phase = Phase::Forwarded;
                Flow::Continue
            }
            Err(error) => self.reject(host, error),
        }
    }

    fn route_request(&mut self, host: &mut dyn Host, body: &[u8]) -> Result<(), ApiError> {
        let op = self.operation.unwrap_or(Operation::ChatCompletions);
        let doc = TopLevel::parse(body).map_err(|e| {
            ApiError::invalid_request(
                Some("invalid_json"),
                format!("The request body is not a valid JSON object: {e}."),
            )
        })?;
        let field = |name: &'static str| {
            doc.get(name).map_err(|_| {
                ApiError::invalid_request(
                    Some("duplicate_parameter"),
                    format!("The parameter '{name}' is given more than once."),
                )
                .with_param(name)
            })
        };
        let (model, model_span, stream) = match self.gemini_call.clone() {
            Some((model, stream)) => (model, None, stream),
            None => {
                let model_field = field("model")?.ok_or_else(|| {
                    ApiError::invalid_request(
                        Some("missing_required_parameter"),
                        "You must provide a model parameter.".into(),
                    )
                    .with_param("model")
                })?;
                let model = doc
                    .str_value(model_field)
                    .ok_or_else(|| invalid_type("model", "a string", model_field.kind))?
                    .into_owned();
                let (required, want) = match op {
                    Operation::ChatCompletions => ("messages", Some(Kind::Array)),
                    Operation::Embeddings => ("input", None),
                };
                let required_field = field(required)?.ok_or_else(|| {
                    ApiError::invalid_request(
                        Some("missing_required_parameter"),
                        format!("Missing required parameter: '{required}'."),
                    )
                    .with_param(required)
                })?;
                if let Some(kind) = want {
                    if required_field.kind != kind {
                        return Err(invalid_type(required, kind.name(), required_field.kind));
                    }
                }
                let stream = match field("stream")? {
                    None => false,
                    Some(s) => match s.kind {
                        Kind::Bool => doc.bool_value(s).unwrap_or(false),
                        Kind::Null => false,
                        other => return Err(invalid_type("stream", "a boolean", other)),
                    },
                };
                (model, Some(model_field.value.clone()), stream)
            }
        };

        let call = Call {
            model,
            model_span,
            stream,
        };
        self.streaming = call.stream;
        match self.role {
            Role::Attempt => {
                let target = self
                    .route
                    .ok_or_else(|| internal("the attempt has no target".into()))?;
                self.prepare_attempt(host, body, &doc, op, &call, target)
            }
            Role::Standalone | Role::Router => {
                let config = Rc::clone(&self.config);
                let applied = self.applied.clone();
                // A namespace alias is the name it stands for from here on:
                // routing, quota matches, downgrades and metric labels.
                let asked = applied.resolve(&call.model).to_string();
                let known = config.target(&asked).is_some();
                self.request_model = Some(if known {
                    asked.clone()
                } else {
                    metrics::OTHER.into()
                });
                if applied.refuses(&config, &asked) {
                    return Err(self.not_allowed(&call.model));
                }
                // A budget past its threshold may send this model elsewhere,
                // but never to one the caller may not use.
                let mut model = asked;
                let allowed = |name: &str| !applied.refuses(&config, name);
                if let Some((to, rule)) = admission::downgrade(
                    &config,
                    &*host,
                    &self.who,
                    &model,
                    applied.rules(),
                    &allowed,
                ) {
                    self.answer_headers.push((
                        DOWNGRADE_RESPONSE_HEADER.into(),
                        format!("{model}->{to};limit={rule}"),
                    ));
                    model = to;
                }
                // Named in metrics even when it turns out unusable.
                self.route = self.first_target(&model);
                let parsed = std::cell::OnceCell::new();
                let request = Request {
                    host: &*host,
                    body,
                    stream: call.stream,
                    parsed: &parsed,
                };
                let (candidates, mut reason, routes) = self.choose_targets(request, &model, op)?;
                self.reason = Some(reason.clone());
                let ask = Ask {
                    body_len: body.len(),
                    max_output: max_output_tokens(&doc, self.caller, op),
                    chain: &candidates,
                    routes: &routes,
                    max_targets: if self.role == Role::Router {
                        config.failover.max_attempts
                    } else {
                        1
                    },
                    caller_schema: self.caller,
                };
                let chain = match admission::admit(&config, host, &self.who, &ask, applied.rules())
                {
                    Ok(mut admitted) => {
                        if let Some(a) = &mut admitted.admission {
                            self.answer_headers.append(&mut a.headers);
                            self.quota_decision = "admitted".into();
                        }
                        self.admission = admitted.admission;
                        if !admitted.over_quota.is_empty() {
                            let names: Vec<&str> = admitted
                                .over_quota
                                .iter()
                                .map(|&m| config.models[m].name.as_str())
                                .collect();
                            reason = format!("{reason};over_quota={}", names.join(","));
                            self.reason = Some(reason.clone());
                        }
                        admitted.chain
                    }
                    Err(refused) => return Err(self.quota_refused(host, *refused)),
                };
                if self
                    .admission
                    .as_ref()
                    .is_some_and(Admission::awaiting_store)
                {
                    self.awaiting_store = Some(AwaitingStore {
                        body: body.to_vec(),
                        op,
                        call,
                        chain,
                        reason,
                    });
                    return Ok(());
                }
                self.forward(host, body, &doc, op, &call, chain, reason)
            }
        }
    }

    fn quota_refused(&mut self, host: &mut dyn Host, refused: admission::Rejection) -> ApiError {
        let (ns, svc) = self.who.names();
        let name = metrics::caller(ns, svc)
            .with(
                "gen_ai_request_model",
                self.request_model.as_deref().unwrap_or("none"),
            )
            .name(
                metrics::QUOTA_REJECTIONS_TOTAL,
                &[("limit", &refused.rule), ("reason", refused.reason)],
            );
        host.count(&name, 1);
        self.quota_decision = format!("rejected:{}:{}", refused.rule, refused.reason);
        self.answer_headers.extend(refused.headers);
        refused.error
    }

    /// After admission: hands a chain to Envoy or prepares the one attempt.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &mut self,
        host: &mut dyn Host,
        body: &[u8],
        doc: &TopLevel,
        op: Operation,
        call: &Call,
        chain: Vec<usize>,
        reason: String,
    ) -> Result<(), ApiError> {
        if self.role == Role::Router {
            if chain.len() > 1 {
                return self.hand_to_envoy(host, op, chain, reason);
            }
            // One target: the upstream half would only repeat what
            // this half can do once, and costs a second body pass.
            self.role = Role::Standalone;
            self.direct = true;
        }
        let target = *chain
            .first()
            .ok_or_else(|| internal("no target was chosen".into()))?;
        self.route = Some(target);
        self.prepare_attempt(host, body, doc, op, call, target)
    }

    /// The targets that may serve `model`, in attempt order (quotas may
    /// drop some, and the chain is cut to `max_attempts` after them), why,
    /// and the routes the request names (quota rules on routes bind them).
    fn choose_targets(
        &self,
        request: Request,
        model: &str,
        op: Operation,
    ) -> Result<(Vec<usize>, String, Vec<usize>), ApiError> {
        let config = &self.config;
        let (mut chain, mut reason) = self.expand(model, request)?;
        let mut routes: Vec<usize> = config.routing_index(model).into_iter().collect();
        if self.role == Role::Router {
            if let Some(extra) = self.extra_models.as_deref() {
                for name in extra.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                    let (more, _) = self.expand(name, request)?;
                    routes.extend(config.routing_index(self.applied.resolve(name)));
                    for m in more {
                        if !chain.contains(&m) {
                            chain.push(m);
                        }
                    }
                }
                reason = format!("request;{reason}");
            }
        }
        let first = chain.first().copied();
        chain.retain(|&m| {
            let route = &config.models[m];
            !config.providers[route.provider].key_missing && route.path(op, false).is_some()
        });
        if chain.is_empty() {
            // Explain why the first choice cannot serve.
            if let Some(m) = first {
                return Err(self.unusable(m, op, model));
            }
            return Err(model_not_found(model));
        }
        Ok((chain, reason, routes))
    }

    /// The configured first target of a model or route name, to name the
    /// request in metrics before (or without) a decision.
    fn first_target(&self, name: &str) -> Option<usize> {
        let config = &self.config;
        config.route_index(name).or_else(|| {
            let policy = &config.routes[config.routing_index(name)?];
            policy.targets.first().map(|t| t.model)
        })
    }

    /// A model name or route name as targets in order, and why.
    fn expand(&self, name: &str, request: Request) -> Result<(Vec<usize>, String), ApiError> {
        let config = &self.config;
        // The caller's own fallbacks pass the same policy as its model.
        if self.applied.refuses(config, name) {
            return Err(self.not_allowed(name));
        }
        let name = self.applied.resolve(name);
        if let Some(i) = config.route_index(name) {
            return Ok((vec![i], "model".into()));
        }
        let policy = config
            .routing_index(name)
            .map(|r| &config.routes[r])
            .ok_or_else(|| model_not_found(name))?;
        self.decide(request, policy)
    }

    /// Orders a route's targets for this request: capabilities, health,
    /// then the route's strategy.
    fn decide(
        &self,
        request: Request,
        policy: &RoutePolicy,
    ) -> Result<(Vec<usize>, String), ApiError> {
        let config = &self.config;
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
        let mut needs = route::needs_from(self.caller, value, stream);
        needs.regions = policy.regions.clone();
        needs.zero_retention = policy.zero_retention;
        if policy.strategy == route::Strategy::Auto {
            needs.auto_hard = Some(route::classify(&route::prompt_features(self.caller, value)));
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

    /// A known name the caller's policy does not allow: 403.
    fn not_allowed(&self, name: &str) -> ApiError {
        let by = match self.applied.source {
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
                self.who.label()
            ),
        )
        .with_param("model")
    }

    /// Why target `m` cannot serve this request.
    fn unusable(&self, m: usize, op: Operation, model: &str) -> ApiError {
        let config = &self.config;
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

    /// Router role: leaves the plan for the upstream half and names each
    /// attempt's provider for Envoy's load balancer.
    fn hand_to_envoy(
        &mut self,
        host: &mut dyn Host,
        op: Operation,
        chain: Vec<usize>,
        reason: String,
    ) -> Result<(), ApiError> {
        let rewrite = |e: crate::host::HostError| {
            internal(format!("could not rewrite the request headers: {e}"))
        };
        let config = Rc::clone(&self.config);
        let mut anthropic = Vec::new();
        let present = self.client_headers(host);
        for name in ANTHROPIC_HEADERS {
            if !present.has(host, name) {
                continue;
            }
            if let Some(value) = host.request_header(name) {
                anthropic.push((name.to_string(), value));
                host.remove_request_header(name).map_err(rewrite)?;
            }
        }
        for name in CLIENT_CREDENTIAL_HEADERS {
            if present.has(host, name) {
                host.remove_request_header(name).map_err(rewrite)?;
            }
        }
        // The listener half holds a chain's complete answers (see `Hold`):
        // an answer cut short after its headers passed the upstream half is
        // answered by Envoy past both halves, in the caller's shape only
        // through the marked request's local_reply_config.
        host.set_request_header(CALLER_API_HEADER, api_name(self.caller))
            .map_err(rewrite)?;
        for position in 0..config.failover.max_attempts {
            let provider = chain.get(position).map_or("-", |&m| {
                config.providers[config.models[m].provider].name.as_str()
            });
            host.set_request_header(&handoff::position_header(position), provider)
                .map_err(rewrite)?;
        }
        // Envoy retries onto the next position; one retry fewer than targets.
        let retries = chain.len().saturating_sub(1).to_string();
        host.set_request_header(MAX_RETRIES_HEADER, &retries)
            .map_err(rewrite)?;
        host.set_request_header(CLUSTER_HEADER, FAILOVER_CLUSTER)
            .map_err(rewrite)?;
        let (ns, svc) = self.who.names();
        let plan = Plan {
            caller: self.caller,
            embeddings: op == Operation::Embeddings,
            gemini: self.gemini_call.clone(),
            chain,
            reason,
            anthropic,
            labels: (
                ns.to_string(),
                svc.to_string(),
                self.request_model.clone().unwrap_or_default(),
            ),
        };
        handoff::leave_plan(host, &plan)
            .map_err(|e| internal(format!("could not store the routing plan: {e}")))?;
        self.route = plan.chain.first().copied();
        self.plan = Some(plan);
        Ok(())
    }

    /// Translates the request for one target and points it there.
    fn prepare_attempt(
        &mut self,
        host: &mut dyn Host,
        body: &[u8],
        doc: &TopLevel,
        op: Operation,
        call: &Call,
        route_index: usize,
    ) -> Result<(), ApiError> {
        let config = Rc::clone(&self.config);
        let route = &config.models[route_index];
        self.route = Some(route_index);
        let provider = &config.providers[route.provider];
        let (model, stream) = (call.model.as_str(), call.stream);
        let model_span = call.model_span.clone();
        if provider.key_missing {
            return Err(self.unusable(route_index, op, model));
        }
        let path = route.path(op, stream).ok_or_else(|| {
            ApiError::invalid_request(
                Some("unsupported_operation"),
                format!(
                    "The model `{model}` is served by provider {:?}, which has no embeddings API.",
                    provider.name
                ),
            )
            .with_param("model")
        })?;
        let (new_body, exchange) = if op == Operation::Embeddings {
            // Embeddings only exist between OpenAI-shaped ends.
            let new_body = (model != route.upstream_model).then(|| {
                crate::core::json::splice(
                    body,
                    model_span.clone().unwrap_or(0..0),
                    route.upstream_model_json.as_bytes(),
                )
            });
            (new_body, None)
        } else {
            let inbound = Inbound {
                caller: self.caller,
                body,
                doc,
                model_span,
                model,
                stream,
            };
            let (b, x) = exchange::translate_request(&inbound, route, provider)?;
            (b, Some(x))
        };
        // The provider may stream on another URL than the caller asked for.
        let path = match &exchange {
            Some(x) => route.path(op, x.stream).unwrap_or(path),
            None => path,
        };
        let sent_body = new_body.as_deref().unwrap_or(body);
        let cluster = match (self.role, self.direct) {
            (Role::Standalone, false) => ClusterChoice::Provider,
            (Role::Standalone, true) => ClusterChoice::FirstPosition,
            _ => ClusterChoice::Chosen,
        };
        let present = self.client_headers(host);
        point_at_provider(host, &present, provider, path, sent_body.len(), cluster)
            .map_err(|e| internal(format!("could not rewrite the request headers: {e}")))?;
        if self.role == Role::Standalone {
            host.set_request_header(CALLER_API_HEADER, api_name(self.caller))
                .map_err(|e| internal(format!("could not rewrite the request headers: {e}")))?;
        }
        // The attempt role cleared them in start_attempt, and set them again
        // only for an Anthropic target.
        if route.schema != Schema::Anthropic && self.role != Role::Attempt {
            for name in ANTHROPIC_HEADERS {
                if host.request_header(name).is_some() {
                    let _ = host.remove_request_header(name);
                }
            }
        }
        if new_body.is_some() {
            host.set_request_header("content-type", "application/json")
                .map_err(|e| internal(format!("could not rewrite the request headers: {e}")))?;
        }
        if let Some(creds) = &provider.aws_credentials {
            sign_for_bedrock(host, provider, path, sent_body, creds)
                .map_err(|e| internal(format!("could not sign the request: {e}")))?;
        }
        if let Some(new_body) = &new_body {
            host.replace_request_body(body.len(), new_body)
                .map_err(|e| internal(format!("could not rewrite the request body: {e}")))?;
        }
        self.exchange = exchange;
        Ok(())
    }

    pub fn on_response_headers(&mut self, host: &mut dyn Host, end_of_stream: bool) -> Flow {
        if self.phase == Phase::Bypass {
            return Flow::Continue;
        }
        let flow = self.response_headers(host, end_of_stream);
        if end_of_stream {
            self.finish(host);
        }
        flow
    }

    pub fn on_response_body(
        &mut self,
        host: &mut dyn Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Flow {
        if self.phase == Phase::Bypass {
            return Flow::Continue;
        }
        let flow = self.response_body(host, body_size, end_of_stream);
        if end_of_stream {
            self.finish(host);
        }
        flow
    }

    fn response_headers(&mut self, host: &mut dyn Host, end_of_stream: bool) -> Flow {
        if self.phase == Phase::Answered {
            return Flow::Continue;
        }
        self.status = host
            .response_header(":status")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if (self.role == Role::Attempt || self.direct) && self.phase == Phase::Forwarded {
            // The upstream half only ever sees a provider's answers; the
            // listener half also sees Envoy's own replies, and only those
            // about the provider (refused, reset, timed out) count.
            let end = if self.role == Role::Attempt || self.status < 400 {
                Some(AttemptEnd::Answered(self.status))
            } else {
                AttemptEnd::of_envoy_reply(self.status, host.response_code_details().as_deref())
            };
            match end {
                Some(end) => self.record_outcome(host, end),
                None => self.outcome_recorded = true,
            }
        }
        if self.role != Role::Attempt && self.phase == Phase::Forwarded {
            self.decorate_answer(host);
        }
        if self.role == Role::Router {
            // The upstream half already answered in the caller's shape and
            // named what served; only Envoy's own replies need work here.
            // (Read here: response headers cannot be read once the body flows.)
            if let Some(attempts) = host.response_header(ATTEMPTS_RESPONSE_HEADER) {
                self.attempt = attempts.parse().unwrap_or(0);
                self.served = host
                    .response_header(PROVIDER_RESPONSE_HEADER)
                    .zip(host.response_header(MODEL_RESPONSE_HEADER));
                if !self.streaming && (200..300).contains(&self.status) && !end_of_stream {
                    self.response = ResponseMode::Hold;
                    return Flow::Pause;
                }
                self.response = ResponseMode::PassThrough;
                if end_of_stream && self.status >= 400 {
                    // A provider's bodiless error, left for Envoy to retry:
                    // the last one is answered here, in the caller's shape.
                    return self.answer_bodiless_error(host);
                }
                return Flow::Continue;
            }
        }
        if self.phase == Phase::Forwarded && self.role != Role::Router {
            if let (Some(provider), Some(route)) = (self.provider(), self.route()) {
                let _ = host.set_response_header(PROVIDER_RESPONSE_HEADER, &provider.name);
                let _ = host.set_response_header(MODEL_RESPONSE_HEADER, &route.upstream_model);
            }
            if let Some(plan) = &self.plan {
                let _ =
                    host.set_response_header(ATTEMPTS_RESPONSE_HEADER, &self.attempt.to_string());
                let _ = host.set_response_header(ROUTE_RESPONSE_HEADER, &plan.reason);
            } else if self.direct {
                // What the upstream half says of a chain's attempts.
                let _ = host.set_response_header(ATTEMPTS_RESPONSE_HEADER, "1");
                if let Some(reason) = &self.reason {
                    let _ = host.set_response_header(ROUTE_RESPONSE_HEADER, reason);
                }
            }
        }
        if self.status >= 400 {
            // `via_upstream` means the provider answered; any other detail
            // means Envoy did (connect failure, timeout, overflow, ...).
            let via_upstream = matches!(
                host.response_code_details().as_deref(),
                Some("via_upstream") | None
            );
            let error_type = host.response_header("x-amzn-errortype");
            let caller_status = match (&self.exchange, via_upstream) {
                (Some(x), true) => exchange::caller_status(x, self.status, error_type.as_deref()),
                _ => self.status,
            };
            let mode = ResponseMode::Error {
                status: self.status,
                via_upstream,
                error_type,
            };
            if caller_status != self.status {
                let _ = host.set_response_header(":status", &caller_status.to_string());
            }
            if end_of_stream && self.role == Role::Attempt {
                // Envoy may still retry it; the listener half answers it if
                // it is the last (see `answer_bodiless_error`).
                self.status = caller_status;
                return Flow::Continue;
            }
            if end_of_stream {
                // No body to rewrite: a whole answer in the caller's shape
                // takes the reply's place.
                let body = self.error_reply_body(&mode, b"");
                self.status = caller_status;
                return self.answer_bodiless(host, body);
            }
            self.response = mode;
            self.status = caller_status;
            // The body is replaced once complete; its length will change.
            let _ = host.remove_response_header("content-length");
            let _ = host.remove_response_header("content-encoding");
            let _ = host.set_response_header("content-type", "application/json");
            // Held with the body, so a reply cut short or too large can
            // still be answered in the caller's shape.
            return Flow::Pause;
        }
        let serving = self.phase == Phase::Forwarded && self.role != Role::Router;
        let Some(x) = self.exchange.as_ref().filter(|_| serving) else {
            // Embeddings: forwarded as they are, usage read on the way.
            if serving && (200..300).contains(&self.status) && !end_of_stream {
                self.response = ResponseMode::Watch(Vec::new());
            }
            return Flow::Continue;
        };
        if !(200..300).contains(&self.status) || end_of_stream {
            return Flow::Continue;
        }
        if x.stream {
            // Provider error events may quote the key: the stream is redacted.
            let secrets = self.provider().map(Provider::secrets).unwrap_or_default();
            let created = host.now_unix_seconds();
            if let Some(translator) = exchange::stream_translator(x, created, &secrets) {
                let _ = host.remove_response_header("content-length");
                let _ = host.remove_response_header("content-encoding");
                let _ = host.set_response_header("content-type", "text/event-stream");
                self.response = ResponseMode::Stream(translator);
            }
            return Flow::Continue;
        }
        if exchange::translates_response(x) {
            let _ = host.remove_response_header("content-length");
            let _ = host.remove_response_header("content-encoding");
            let _ = host.set_response_header("content-type", "application/json");
            self.response = ResponseMode::Translate;
            // Hold the headers: an answer that cannot be translated must not
            // go out as a 200. The upstream half lets them pass (the listener
            // half holds them): held there, Envoy would take a provider
            // that broke off mid-answer for one that never answered, and
            // send the request to the next target too.
            return if self.role == Role::Attempt {
                Flow::Continue
            } else {
                Flow::Pause
            };
        }
        self.response = ResponseMode::Watch(Vec::new());
        Flow::Continue
    }

    /// Listener roles: the caller's rate-limit state, budget alerts and
    /// downgrades go on the answer, in place of the provider's own limits.
    fn decorate_answer(&mut self, host: &mut dyn Host) {
        if self.config.quotas.is_some() || !self.applied.rules().is_empty() {
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
        for (name, value) in &self.answer_headers {
            let _ = host.set_response_header(name, value);
        }
    }

    /// Serving roles: keeps the provider's token counts; the upstream half
    /// also leaves them for the listener half, which settles the quota.
    fn note_usage(&mut self, host: &mut dyn Host, usage: Option<Usage>) {
        let Some(u) = usage else { return };
        self.usage = Some(u);
        if let (Role::Attempt, Some(target)) = (self.role, self.route) {
            if let Err(e) = handoff::leave_usage(host, target, &u) {
                log::warn!("could not leave the usage for the listener filter: {e}");
            }
        }
    }

    /// The provider's schema for the current target.
    fn provider_schema(&self) -> Schema {
        self.route().map_or(Schema::OpenAi, |r| r.schema)
    }

    fn response_body(
        &mut self,
        host: &mut dyn Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Flow {
        if self.role != Role::Attempt
            && matches!(
                self.response,
                ResponseMode::PassThrough | ResponseMode::Stream(_) | ResponseMode::Watch(_)
            )
        {
            self.response_bytes += body_size as u64;
            if body_size > 0 && self.first_byte_us.is_none() {
                self.first_byte_us = Some(host.now_unix_micros());
            }
        }
        if let ResponseMode::Stream(translator) = &mut self.response {
            let flow = translate_stream_chunk(host, translator.as_mut(), body_size, end_of_stream);
            if end_of_stream {
                let usage = translator.usage();
                self.note_usage(host, usage);
            }
            return flow;
        }
        let provider_schema = self.provider_schema();
        if let ResponseMode::Watch(copy) = &mut self.response {
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
            return Flow::Continue;
        }
        if matches!(self.response, ResponseMode::PassThrough) {
            return Flow::Continue;
        }
        if matches!(self.response, ResponseMode::Hold) {
            // Held whole here: past the limit the caller gets an error in
            // its shape, not Envoy's.
            if body_size > self.config.max_response_bytes {
                return self.answer_too_large(host);
            }
            if !end_of_stream {
                return Flow::Pause;
            }
            self.response = ResponseMode::PassThrough;
            self.response_bytes += body_size as u64;
            self.first_byte_us = Some(host.now_unix_micros());
            if let Some(status) = handoff::answer_status(host) {
                self.status = status;
                let _ = host.set_response_header(":status", &status.to_string());
            }
            return Flow::Continue;
        }
        // Error replies and translated answers are held whole: past the
        // limit the caller gets an error in its shape, not Envoy's.
        if body_size > self.config.max_response_bytes {
            if self.role == Role::Attempt && matches!(self.response, ResponseMode::Translate) {
                // Its headers passed (see `Translate`): the listener half
                // holds this answer and refuses it past the same limit.
                self.response = ResponseMode::PassThrough;
                return Flow::Continue;
            }
            return self.answer_too_large(host);
        }
        if !end_of_stream {
            return Flow::Pause;
        }
        let mode = std::mem::replace(&mut self.response, ResponseMode::PassThrough);
        let body = match host.response_body(body_size) {
            Ok(b) => b,
            Err(e) => {
                log::warn!("could not read a response body: {e}");
                return Flow::Continue;
            }
        };
        let config = Rc::clone(&self.config);
        let provider = self
            .route
            .map(|i| config.providers[config.models[i].provider].name.as_str());
        let new_body = match mode {
            ResponseMode::Error { .. } => self.error_reply_body(&mode, &body),
            ResponseMode::Translate => {
                let usage = crate::translate::usage_of_answer(self.provider_schema(), &body);
                self.note_usage(host, usage);
                let translated = match &self.exchange {
                    Some(x) => exchange::translate_response(x, &body, host.now_unix_seconds()),
                    None => Ok(None),
                };
                match translated {
                    Ok(b) => b,
                    Err(e) => {
                        log::warn!("could not translate a provider answer: {e}");
                        self.status = 502;
                        if self.role == Role::Attempt {
                            // The headers passed already; the listener half
                            // holds them and sets this status.
                            let _ = handoff::leave_answer_status(host, 502);
                        } else {
                            let _ = host.set_response_header(":status", "502");
                        }
                        let error = ApiError::new(
                            502,
                            "server_error",
                            Some("invalid_provider_response"),
                            format!(
                                "Provider {:?} sent an answer the gateway could not \
                                 translate: {e}.",
                                provider.unwrap_or("none")
                            ),
                        );
                        Some(exchange::error_body(self.caller, &error))
                    }
                }
            }
            ResponseMode::PassThrough
            | ResponseMode::Hold
            | ResponseMode::Stream(_)
            | ResponseMode::Watch(_) => None,
        };
        if let Some(new_body) = new_body {
            if let Err(e) = host.replace_response_body(body_size, &new_body) {
                log::warn!("could not rewrite a response body: {e}");
            }
        }
        Flow::Continue
    }

    /// An error reply's body in the caller's shape (None: pass it as it is).
    fn error_reply_body(&self, mode: &ResponseMode, body: &[u8]) -> Option<Vec<u8>> {
        let ResponseMode::Error {
            status,
            via_upstream,
            error_type,
        } = mode
        else {
            return None;
        };
        let provider = self.provider();
        let secrets: Vec<&str> = provider.map(Provider::secrets).unwrap_or_default();
        let reply = ErrorReply {
            status: *status,
            body,
            error_type: error_type.as_deref(),
            via_upstream: *via_upstream,
            provider: provider.map(|p| p.name.as_str()),
            secrets: &secrets,
        };
        exchange::translate_error(self.caller, self.exchange.as_ref(), &reply)
    }

    /// Router role: a provider's error reply without a body, passed on by
    /// the upstream half (the status already the caller's), in the
    /// caller's shape.
    fn answer_bodiless_error(&mut self, host: &mut dyn Host) -> Flow {
        let provider = self.served.as_ref().map(|(p, _)| p.clone());
        let reply = ErrorReply {
            status: self.status,
            body: b"",
            error_type: None,
            via_upstream: true,
            provider: provider.as_deref(),
            secrets: &[],
        };
        let body = exchange::translate_error(self.caller, None, &reply);
        self.answer_bodiless(host, body)
    }

    /// Sends `body` (an empty reply's rewrite) in place of the reply; were
    /// there none, a plain one of the caller's shape says what happened.
    fn answer_bodiless(&mut self, host: &mut dyn Host, body: Option<Vec<u8>>) -> Flow {
        let status = self.status;
        let body = body.unwrap_or_else(|| {
            let error = ApiError::new(
                status,
                crate::core::api_error::error_type_for_status(status),
                None,
                format!("The provider answered HTTP {status} with no details."),
            );
            exchange::error_body(self.caller, &error)
        });
        self.replace_answer(host, status, &body)
    }

    /// The answer held past the limit: an error in the caller's shape
    /// replaces it (502 for an answer, the reply's status for an error).
    fn answer_too_large(&mut self, host: &mut dyn Host) -> Flow {
        let limit = self.config.max_response_bytes;
        let provider = self.provider().map_or("none", |p| p.name.as_str());
        let error = match self.response {
            ResponseMode::Error { status, .. } => ApiError::new(
                self.status,
                crate::core::api_error::error_type_for_status(self.status),
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
        self.response = ResponseMode::PassThrough;
        let body = exchange::error_body(self.caller, &error);
        self.replace_answer(host, error.status, &body)
    }

    /// Replaces an answer whose headers this filter still holds with a
    /// reply of its own. Envoy sends it to the caller at once (from the
    /// upstream half, through the listener half) and drops the rest of the
    /// provider's answer. What the caller needs of the held headers stays.
    fn replace_answer(&mut self, host: &mut dyn Host, status: u16, body: &[u8]) -> Flow {
        const KEPT: &[&str] = &[
            "retry-after",
            "x-should-retry",
            PROVIDER_RESPONSE_HEADER,
            MODEL_RESPONSE_HEADER,
            ROUTE_RESPONSE_HEADER,
            ATTEMPTS_RESPONSE_HEADER,
        ];
        let mut kept: Vec<(String, String)> = KEPT
            .iter()
            // The upstream half names its attempt itself (see `reply`).
            .filter(|name| self.role != Role::Attempt || **name != ATTEMPTS_RESPONSE_HEADER)
            .filter_map(|name| Some((name.to_string(), host.response_header(name)?)))
            .collect();
        if self.role != Role::Attempt {
            kept.extend(self.answer_headers.iter().cloned());
        }
        // Counted as the forwarded call it was, before `reply` marks it answered.
        self.status = status;
        self.finish(host);
        let extra: Vec<(&str, &str)> = kept.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        self.reply(host, status, &extra, body)
    }

    /// Serving roles with health: feeds the target's health record and
    /// `meshllm_attempts_total` with how the attempt ended.
    fn record_outcome(&mut self, host: &mut dyn Host, end: AttemptEnd) {
        let Some(route) = self.route else { return };
        self.outcome_recorded = true;
        self.attempt_end = Some(end);
        self.count_attempt(host, end);
        let now = host.now_unix_millis();
        let outcome = match end {
            AttemptEnd::Answered(200..=299) => {
                let latency_ms = now.saturating_sub(self.started_us / 1000);
                let stream = self.exchange.as_ref().is_some_and(|x| x.stream);
                Outcome::Success {
                    latency_ms,
                    ttft_ms: stream.then_some(latency_ms),
                }
            }
            AttemptEnd::Answered(429) => Outcome::RateLimited {
                retry_after_secs: host
                    .response_header("retry-after")
                    .and_then(|v| health::parse_retry_after(&v, now / 1000)),
            },
            AttemptEnd::Answered(500..=599)
            | AttemptEnd::ConnectFailure
            | AttemptEnd::Reset
            | AttemptEnd::Timeout => Outcome::Failure,
            // The caller's own mistakes say nothing about the target.
            AttemptEnd::Answered(_) => return,
        };
        let name = self.config.models[route].name.clone();
        health::record(host, &name, &outcome, now, &HealthPolicy::default());
    }

    /// Attempt role: `meshllm_attempts_total` for this attempt's outcome
    /// (the listener half counts a single-target request's own attempt).
    fn count_attempt(&self, host: &mut dyn Host, end: AttemptEnd) {
        let (Some(plan), Some(target)) = (&self.plan, self.route) else {
            return;
        };
        let labels = attempt_labels(&self.config, plan, target);
        let name = match end.error_type() {
            Some(e) => labels.name(metrics::ATTEMPTS_TOTAL, &[("error_type", &e)]),
            None => labels.name(metrics::ATTEMPTS_TOTAL, &[]),
        };
        host.count(&name, 1);
    }

    /// Attempt role: the attempt ended with no response at all. Envoy
    /// says why only in the upstream connection's state: no connection
    /// (refused, unreachable, TLS failure), or one that was reset, or
    /// closed when the per-try timeout fired. `None` when the caller went
    /// away first: that says nothing about the provider.
    fn unanswered_attempt(&self, host: &dyn Host) -> Option<AttemptEnd> {
        if let Some(details) = host.response_code_details() {
            if !details.starts_with("upstream_") {
                return None;
            }
        }
        let connected = host.property(UPSTREAM_LOCAL_ADDRESS).is_some()
            && host.property(UPSTREAM_TRANSPORT_FAILURE).is_none();
        if !connected {
            return Some(AttemptEnd::ConnectFailure);
        }
        // An attempt that lasted the per-try timeout hit it. Envoy's timers
        // run on the event loop's cached clock and fire up to tens of ms
        // early by this half's reading: a tenth of the timeout is allowed.
        let elapsed_ms = host.now_unix_micros().saturating_sub(self.started_us) / 1000;
        let timeout_ms = self.config.failover.per_try_timeout_ms;
        if elapsed_ms + timeout_ms / 10 >= timeout_ms {
            Some(AttemptEnd::Timeout)
        } else {
            Some(AttemptEnd::Reset)
        }
    }

    /// The answer to a call this request made (see `host::callout`): the
    /// shared quota store's, for a request paused at admission.
    pub fn on_callout(&mut self, host: &mut dyn Host, id: CalloutId, answer: CalloutAnswer) {
        let (Some(waiting), Some(admission)) = (self.awaiting_store.take(), self.admission.take())
        else {
            log::warn!(
                "an answer came for call {id}, which this request does not wait for: {answer:?}"
            );
            return;
        };
        let config = Rc::clone(&self.config);
        let result =
            match admission::on_store_answer(&config, host, &self.who, admission, id, &answer) {
                Ok(admission::StoreStep::Waiting(a)) => {
                    self.admission = Some(a);
                    self.awaiting_store = Some(waiting);
                    return;
                }
                Ok(admission::StoreStep::Go(mut a)) => {
                    self.answer_headers.append(&mut a.headers);
                    self.admission = Some(a);
                    match TopLevel::parse(&waiting.body) {
                        Ok(doc) => self.forward(
                            host,
                            &waiting.body,
                            &doc,
                            waiting.op,
                            &waiting.call,
                            waiting.chain,
                            waiting.reason,
                        ),
                        Err(e) => Err(internal(format!("could not read the request again: {e}"))),
                    }
                }
                Err(refused) => Err(self.quota_refused(host, *refused)),
            };
        match result {
            Ok(()) => {
                self.phase = Phase::Forwarded;
                if let Err(e) = host.resume_request() {
                    log::error!("could not resume the request after the quota store: {e}");
                }
            }
            Err(error) => {
                self.reject(host, error);
            }
        }
    }

    pub fn on_done(&mut self, host: &mut dyn Host) {
        if self.role == Role::Attempt {
            if self.phase == Phase::Forwarded && !self.outcome_recorded {
                self.outcome_recorded = true;
                if let Some(end) = self.unanswered_attempt(host) {
                    self.record_outcome(host, end);
                }
            }
            return;
        }
        self.finish(host);
    }

    /// Listener roles, once per request, as soon as the answer is complete
    /// (so access logs see the fields) or when the request is abandoned:
    /// counts it, settles its reservation and records what it cost.
    fn finish(&mut self, host: &mut dyn Host) {
        if self.finished || self.role == Role::Attempt || self.phase == Phase::Bypass {
            return;
        }
        self.finished = true;
        let served = self.served.take();
        let config = Rc::clone(&self.config);
        // The target that answered: the upstream half says so with its
        // usage; otherwise the provider and model it named.
        let reported = match self.role {
            Role::Router => handoff::usage(host).filter(|(t, _)| *t < config.models.len()),
            _ => {
                if self.usage.is_none() {
                    if let ResponseMode::Stream(t) = &self.response {
                        self.usage = t.usage();
                    }
                }
                self.route.zip(self.usage)
            }
        };
        let served_index = match (&reported, &served) {
            (Some((t, _)), _) => Some(*t),
            (None, Some((p, upstream))) => self.plan.as_ref().and_then(|plan| {
                plan.chain.iter().copied().find(|&m| {
                    let r = &config.models[m];
                    r.upstream_model == *upstream && config.providers[r.provider].name == *p
                })
            }),
            (None, None) if self.role == Role::Standalone => self.route,
            (None, None) => None,
        };
        let first = self.route.map(|i| &config.models[i]);
        // The provider that answered (or was to), and the model it ran.
        let provider = match (&served, served_index.or(self.route)) {
            (Some((p, _)), _) => p.as_str(),
            (None, Some(m)) => config.providers[config.models[m].provider].name.as_str(),
            (None, None) => "none",
        };
        let response_model = match (&served, served_index) {
            (Some((_, m)), _) => m.as_str(),
            (None, Some(m)) => config.models[m].upstream_model.as_str(),
            (None, None) => "none",
        };
        let Some(op) = self.operation else {
            // Listings and unknown URLs are not LLM calls.
            return;
        };
        let (ns, svc) = self.who.names();
        let embeddings = op == Operation::Embeddings;
        let request_model = self.request_model.as_deref().unwrap_or("none");
        let labels =
            metrics::call_labels(ns, svc, embeddings, provider, request_model, response_model);
        let now = host.now_unix_micros();
        let error = metrics::error_type(self.status);
        let error_label: &[(&str, &str)] = match &error {
            Some(e) => &[("error_type", e.as_str())],
            None => &[],
        };
        host.count(&labels.name(metrics::REQUESTS_TOTAL, error_label), 1);
        host.histogram(
            &labels.name(metrics::REQUEST_DURATION, error_label),
            metrics::millis(now.saturating_sub(self.started_us)),
        );
        if let (Some(reason), Some(first)) = (&self.reason, first) {
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
                        embeddings,
                        first_provider,
                        request_model,
                        &first.upstream_model,
                    );
                    &first_labels
                };
            let name = route_labels.name(
                metrics::ROUTE_DECISIONS_TOTAL,
                &[("route_reason", &metrics::route_reason(reason))],
            );
            host.count(&name, 1);
        }
        if self.role == Role::Standalone && self.phase == Phase::Forwarded {
            // The request was its only attempt; with health, counted as
            // the provider's part ended (none when Envoy never sent it).
            match (self.direct, self.attempt_end.map(AttemptEnd::error_type)) {
                (false, _) => {
                    host.count(&labels.name(metrics::ATTEMPTS_TOTAL, error_label), 1);
                }
                (true, Some(Some(e))) => {
                    let name = labels.name(metrics::ATTEMPTS_TOTAL, &[("error_type", &e)]);
                    host.count(&name, 1);
                }
                (true, Some(None)) => host.count(&labels.name(metrics::ATTEMPTS_TOTAL, &[]), 1),
                (true, None) => {}
            }
        }
        if self.phase != Phase::Forwarded && self.phase != Phase::Answered {
            // Abandoned while the quota store was asked: local reservations
            // go back; the store's, if it made one, stays counted.
            if let Some(a) = self.admission.take() {
                admission::abandon(host, a);
            }
            return;
        }
        let outcome = admission::Outcome {
            usage: reported.map(|(_, u)| u),
            served: served_index,
            // The upstream half numbers the attempt that answered; a lone
            // target is tried once.
            attempts: match self.role {
                Role::Router => (self.attempt > 0).then_some(self.attempt as usize),
                _ => Some(1),
            },
            status: self.status,
            response_bytes: self.response_bytes,
        };
        let charge = admission::charge(&config, self.admission.as_ref(), &outcome);
        if let Some(a) = self.admission.take() {
            admission::settle(&config, host, &self.who, &a, &charge, &outcome);
        }
        // A streamed answer's first byte, and its pace after it.
        let ttft_us = match (self.streaming, self.first_byte_us) {
            (true, Some(at)) if (200..300).contains(&self.status) => {
                let ttft = at.saturating_sub(self.started_us);
                host.histogram(
                    &labels.name(metrics::TIME_TO_FIRST_TOKEN, &[]),
                    metrics::millis(ttft),
                );
                let out = charge.usage.output_tokens;
                if out > 1 && !charge.estimated {
                    let per_token = now.saturating_sub(at) / (out - 1);
                    host.histogram(
                        &labels.name(metrics::TIME_PER_OUTPUT_TOKEN, &[]),
                        metrics::millis(per_token),
                    );
                }
                Some(ttft)
            }
            _ => None,
        };
        let attempts = match self.role {
            Role::Router => self.attempt,
            _ => u32::from(self.phase == Phase::Forwarded),
        };
        let fields = LogFields {
            provider,
            response_model,
            attempts,
            ttft_us,
        };
        self.account(host, &labels, &charge, &fields);
    }

    /// Listener roles: what the request cost, in metrics (by caller, model
    /// and the tag values the config names) and in access-log fields.
    fn account(
        &self,
        host: &mut dyn Host,
        labels: &metrics::Labels,
        charge: &admission::Charge,
        fields: &LogFields,
    ) {
        let config = Rc::clone(&self.config);
        let mut tag_labels: Vec<(&str, &str)> = config
            .tags
            .iter()
            .enumerate()
            .map(|(i, tag)| {
                let value = self
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
                    host.histogram(
                        &labels.name(metrics::TOKEN_USAGE, &[("gen_ai_token_type", kind)]),
                        n,
                    );
                }
                tag_labels.push(("gen_ai_token_type", kind));
                host.count(&labels.name(metrics::TOKENS_TOTAL, &tag_labels), n);
                tag_labels.pop();
            }
            host.count(
                &labels.name(metrics::COST_TOTAL, &tag_labels),
                charge.micro_usd,
            );
        }
        let all_tags: Vec<String> = self
            .who
            .tags
            .iter()
            .filter_map(|(i, v)| Some(format!("{}={v}", config.tags.get(*i)?.name)))
            .collect();
        let requested = self.request_model.as_deref().unwrap_or("-");
        let mut log: Vec<(&str, String)> = vec![
            (LOG_CALLER, self.who.label()),
            (LOG_PROVIDER, fields.provider.to_string()),
            (LOG_REQUEST_MODEL, requested.to_string()),
            (LOG_RESPONSE_MODEL, fields.response_model.to_string()),
            (LOG_ATTEMPTS, fields.attempts.to_string()),
            (LOG_INPUT_TOKENS, u.input_tokens.to_string()),
            (LOG_OUTPUT_TOKENS, u.output_tokens.to_string()),
            (LOG_CACHED_TOKENS, u.cached_input_tokens.to_string()),
            (LOG_COST, charge.micro_usd.to_string()),
            (LOG_QUOTA, self.quota_decision.clone()),
            (LOG_POLICY, self.applied.source.name().to_string()),
        ];
        // Absent fields show as `-` in access logs: not set at all.
        if !all_tags.is_empty() {
            log.push((LOG_TAGS, all_tags.join(",")));
        }
        if let Some(reason) = &self.reason {
            log.push((LOG_ROUTE_REASON, reason.clone()));
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
}

/// What `finish` learned that the access log shows.
struct LogFields<'a> {
    provider: &'a str,
    response_model: &'a str,
    attempts: u32,
    ttft_us: Option<u64>,
}

/// An attempt's labels: the caller and requested model from the plan, the
/// target's provider and model.
fn attempt_labels(config: &Config, plan: &Plan, target: usize) -> metrics::Labels {
    let route = &config.models[target];
    let (ns, svc, model) = &plan.labels;
    metrics::call_labels(
        ns,
        svc,
        plan.embeddings,
        &config.providers[route.provider].name,
        model,
        &route.upstream_model,
    )
}

/// The most output tokens the request asks for, in its caller's terms.
fn max_output_tokens(doc: &TopLevel, caller: Schema, op: Operation) -> Option<u64> {
    if op == Operation::Embeddings {
        return Some(0);
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
        Schema::OpenAi | Schema::Converse => {
            number("max_completion_tokens").or_else(|| number("max_tokens"))
        }
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

/// Adds the SigV4 headers Bedrock requires, over the body as sent.
fn sign_for_bedrock(
    host: &mut dyn Host,
    provider: &Provider,
    path: &str,
    body: &[u8],
    creds: &crate::config::providers::AwsCredentials,
) -> HostResult {
    let (path_only, query) = path.split_once('?').unwrap_or((path, ""));
    let credentials = sigv4::Credentials {
        access_key_id: creds.access_key_id.clone(),
        secret_access_key: creds.secret_access_key.clone(),
        session_token: creds.session_token.clone(),
    };
    let headers = sigv4::sign(
        "POST",
        path_only,
        query,
        &provider.authority,
        "application/json",
        body,
        provider.region.as_deref().unwrap_or_default(),
        "bedrock",
        &credentials,
        host.now_unix_seconds(),
    );
    for (name, value) in &headers {
        host.set_request_header(name, value)?;
    }
    Ok(())
}

/// Listener roles: the path the caller asked for, for the access log.
fn keep_caller_path(host: &mut dyn Host) {
    if let Some(path) = host.request_header(":path") {
        if let Err(e) = host.set_property(&[LOG_PATH], path.as_bytes()) {
            log::debug!("could not set access-log field {LOG_PATH}: {e}");
        }
    }
}

/// Which cluster a request is sent to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ClusterChoice {
    /// Failover off: the provider's own cluster.
    Provider,
    /// Failover on, one target: the first position's cluster, whose load
    /// balancer picks the provider named in the position header.
    FirstPosition,
    /// The upstream half: Envoy already chose the cluster and host.
    Chosen,
}

fn point_at_provider(
    host: &mut dyn Host,
    present: &RequestHeaders,
    provider: &Provider,
    path: &str,
    body_len: usize,
    cluster: ClusterChoice,
) -> HostResult {
    for name in CLIENT_CREDENTIAL_HEADERS {
        if present.has(host, name) {
            host.remove_request_header(name)?;
        }
    }
    // Error replies and (later) usage must be readable. No accept-encoding
    // at all would allow any encoding, so ask for identity explicitly.
    host.set_request_header("accept-encoding", "identity")?;
    host.set_request_header(":authority", &provider.authority)?;
    host.set_request_header(":path", path)?;
    match cluster {
        ClusterChoice::Provider => host.set_request_header(CLUSTER_HEADER, &provider.cluster)?,
        ClusterChoice::FirstPosition => {
            host.set_request_header(CLUSTER_HEADER, FIRST_POSITION_CLUSTER)?;
            host.set_request_header(&handoff::position_header(0), &provider.name)?;
        }
        ClusterChoice::Chosen => {}
    }
    if let Some((name, value)) = &provider.auth_header {
        host.set_request_header(name, value)?;
    }
    for (name, value) in &provider.extra_headers {
        host.set_request_header(name, value)?;
    }
    host.set_request_header("content-length", &body_len.to_string())?;
    Ok(())
}

/// How one attempt at a provider ended, for the target's health and the
/// `error_type` of `meshllm_attempts_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AttemptEnd {
    /// The provider answered with this status.
    Answered(u16),
    /// No connection: refused, unreachable, TLS handshake failed.
    ConnectFailure,
    /// The connection was reset or closed before response headers.
    Reset,
    /// No response headers within the per-try timeout.
    Timeout,
}

impl AttemptEnd {
    fn error_type(self) -> Option<String> {
        match self {
            AttemptEnd::Answered(status) => metrics::error_type(status),
            AttemptEnd::ConnectFailure => Some("connect_failure".into()),
            AttemptEnd::Reset => Some("reset".into()),
            AttemptEnd::Timeout => Some("timeout".into()),
        }
    }

    /// An error answer the listener half saw, by Envoy's response code
    /// details: the provider's own, or Envoy's about the provider. `None`
    /// for Envoy's refusals that no provider caused (no healthy upstream,
    /// overflow, a local reset, a missing cluster).
    fn of_envoy_reply(status: u16, details: Option<&str>) -> Option<AttemptEnd> {
        let Some(details) = details else {
            return Some(AttemptEnd::Answered(status));
        };
        if details == "via_upstream" {
            return Some(AttemptEnd::Answered(status));
        }
        if details == "upstream_per_try_timeout" || details == "upstream_response_timeout" {
            return Some(AttemptEnd::Timeout);
        }
        let reason = details.strip_prefix("upstream_reset_before_response_started")?;
        if reason.contains("connection_failure") {
            Some(AttemptEnd::ConnectFailure)
        } else if reason.contains("overflow") || reason.contains("local_reset") {
            None
        } else {
            Some(AttemptEnd::Reset)
        }
    }
}

fn model_not_found(model: &str) -> ApiError {
    ApiError::new(
        404,
        "invalid_request_error",
        Some("model_not_found"),
        format!(
            "The model `{model}` does not exist or you do not have access to it. \
             GET /v1/models lists the models this gateway serves."
        ),
    )
    .with_param("model")
}

fn invalid_type(param: &'static str, want: &str, got: Kind) -> ApiError {
    ApiError::invalid_request(
        Some("invalid_type"),
        format!(
            "Invalid type for '{param}': expected {want}, but got {}.",
            got.name()
        ),
    )
    .with_param(param)
}

fn internal(message: String) -> ApiError {
    log::error!("{message}");
    ApiError::new(
        500,
        "server_error",
        Some("gateway_error"),
        format!("Gateway error: {message}."),
    )
}

#[cfg(test)]
#[path = "filter_tests.rs"]
mod tests;
