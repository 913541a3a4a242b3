//! The state both halves carry, which every stage reads and writes: the
//! listener half's [`Router`] with its request's state, an [`Attempt`],
//! and the types of their fields. No stage is imported here; the stages
//! add their own `impl Router` / `impl Attempt` blocks.

use std::rc::Rc;

use super::answer::Answer;
use crate::access::namespace_policy::Applied;
use crate::config::models::{ModelRoute, Operation};
use crate::config::providers::Provider;
use crate::config::Config;
use crate::core::schema::Schema;
use crate::core::usage::Usage;
use crate::host::{CalloutId, Host};
use crate::metrics;
use crate::pipeline::handoff::Plan;
use crate::quota::admission::{Admission, Who};
use crate::translate::exchange::Exchange;

/// How far a request (or an upstream attempt) got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Nothing decided yet.
    Start,
    /// Buffering the request body of an LLM call.
    ReadingBody,
    /// Waiting for a call to another service (the shared quota store: see `admit.rs`).
    Deferred,
    /// Sent to a provider.
    Forwarded,
    /// Answered by the filter itself.
    Answered,
    /// Not for a host the filter handles: passed through untouched.
    Bypass,
}

/// What the listener half's stages know of the request: each stage reads
/// what those before it wrote.
pub(super) struct RequestState {
    /// The API the caller speaks; errors go back in its shape.
    pub caller: Schema,
    /// The path the caller asked for (for the access log).
    pub path: String,
    /// None for listings and unknown URLs, which are not LLM calls.
    pub operation: Option<Operation>,
    /// Gemini callers name the model and streaming in the URL.
    pub gemini_call: Option<(String, bool)>,
    /// The caller asked for a streamed answer.
    pub streaming: bool,
    /// The answer's status as the caller sees it.
    pub status: u16,
    /// When the request started, in µs.
    pub started_us: u64,
    /// When the answer's first byte passed, in µs.
    pub first_byte_us: Option<u64>,
    /// Answer bytes passed to the caller.
    pub response_bytes: u64,
    /// Who called.
    pub who: Who,
    /// The namespace policy in force (mesh, document namespace entry or
    /// listener metadata).
    pub applied: Applied,
    /// What the request reserved.
    pub admission: Option<Admission>,
    /// Headers for the caller's answer (rate limits, budget alerts,
    /// downgrades) and for a refusal.
    pub answer_headers: Vec<(String, String)>,
    /// `admitted`, `rejected:<limit>:<reason>` or `none`.
    pub quota_decision: String,
    /// The model the caller asked for, as a metric label (a name the
    /// config does not know is `_OTHER`).
    pub request_model: Option<String>,
    /// Why the first target was chosen.
    pub reason: Option<String>,
    /// The target the request is named by in metrics: the first the
    /// routing chose (or the configured first, before a decision).
    pub route: Option<usize>,
    /// The caller's own fallbacks (`x-meshllm-models`), taken off the
    /// request at the entrance with every other internal header.
    pub extra_models: Option<String>,
    /// The request's header names as listed at the entrance, reused where
    /// client headers are removed later.
    pub entry_headers: Option<Vec<String>>,
    /// A call on stored objects: the provider it went to.
    pub account_provider: Option<usize>,
    /// Guardrail decisions, as the access log shows them
    /// (`rule:action:side:found`).
    pub guard_log: Vec<String>,
    /// The caller's guardrails on answers (rules with `on: response`).
    pub answer_guard: Vec<usize>,
    /// Where a streamed answer's guard leaves its decisions.
    pub guard_sink: Option<crate::guard::stream::DecisionSink>,
    /// What the response cache does for this request.
    pub cache: CacheUse,
    /// The request was counted and settled.
    pub finished: bool,
}

/// What the response cache does for one request (see `cache.rs`).
pub(super) enum CacheUse {
    /// Not cached: no cache, or not for this caller, model or operation.
    Off,
    /// Cacheable in principle, but not this request.
    Bypass(crate::cache::key::Bypass),
    /// Answered from the cache by the answer of this provider and model
    /// (`shared`: found in the shared store).
    Hit {
        provider: String,
        model: String,
        shared: bool,
    },
    /// Sent on; its answer is kept if it comes back whole.
    Fill(Fill),
}

/// An answer on its way to the caller, copied to be kept.
pub(super) struct Fill {
    pub key: [u8; 32],
    /// Looked up and not found (false: `Cache-Control: no-cache`).
    pub looked_up: bool,
    /// The bytes the caller got so far.
    pub copy: Vec<u8>,
    /// Past `max_entry_bytes`, replaced by the filter, or unreadable.
    pub spoiled: bool,
    /// The last byte passed.
    pub ended: bool,
}

impl Default for RequestState {
    fn default() -> Self {
        RequestState {
            caller: Schema::OpenAi,
            path: String::new(),
            operation: None,
            gemini_call: None,
            streaming: false,
            status: 0,
            started_us: 0,
            first_byte_us: None,
            response_bytes: 0,
            who: Who::default(),
            applied: Applied::default(),
            admission: None,
            answer_headers: Vec::new(),
            quota_decision: "none".into(),
            request_model: None,
            reason: None,
            route: None,
            extra_models: None,
            entry_headers: None,
            account_provider: None,
            guard_log: Vec::new(),
            answer_guard: Vec::new(),
            guard_sink: None,
            cache: CacheUse::Off,
            finished: false,
        }
    }
}

impl RequestState {
    /// The client's request headers: the entrance's listing when there was
    /// one (the filter adds no header it later looks for, and removing a
    /// name removed since is a no-op), else a fresh one.
    pub fn client_headers(&mut self, host: &dyn Host) -> RequestHeaders {
        match self.entry_headers.take() {
            Some(names) => RequestHeaders(Some(names)),
            None => RequestHeaders::list(host),
        }
    }
}

/// Which of many request headers are present, from one listing of the map
/// instead of a host call per name. The listing may name headers removed
/// since (removing one again is a harmless no-op); when it failed, each
/// name is asked for on its own.
pub(super) struct RequestHeaders(pub Option<Vec<String>>);

impl RequestHeaders {
    pub fn list(host: &dyn Host) -> Self {
        RequestHeaders(host.request_header_names().ok())
    }

    pub fn has(&self, host: &dyn Host, name: &str) -> bool {
        match &self.0 {
            Some(names) => names.iter().any(|n| n.eq_ignore_ascii_case(name)),
            None => host.request_header(name).is_some(),
        }
    }
}

/// The model and streaming choice read from a call's body (or URL).
#[derive(Clone)]
pub(super) struct Call {
    pub model: String,
    pub model_span: Option<std::ops::Range<usize>>,
    pub stream: bool,
}

/// What the route stage decided, for the admit and forward stages.
pub(super) struct Routed {
    /// The call as the caller made it (its own model name).
    pub call: Call,
    /// The targets that may serve, in attempt order, before quotas.
    pub candidates: Vec<usize>,
    /// Why they are in that order.
    pub reason: String,
    /// The routes the request names (quota rules on routes bind them).
    pub routes: Vec<usize>,
    /// The most output tokens the request asks for.
    pub max_output: Option<u64>,
}

// ---- the listener half ---------------------------------------------------

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

/// A request waiting in the admit stage (the quota store) or the cache
/// stage (the shared cache) for a call's answer.
pub(super) struct Deferred {
    pub id: CalloutId,
    pub body: Vec<u8>,
    pub routed: Routed,
    /// The targets that may serve if the answer admits.
    pub chain: Vec<usize>,
}

/// The listener half of one request (see `router.rs`).
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
    pub(super) deferred: Option<Deferred>,
    /// Waiting for an external guardrail.
    pub(super) guard_wait: Option<super::guard::GuardWait>,
    /// Waiting for the shared cache.
    pub(super) cache_wait: Option<Deferred>,
    /// A complete answer held while an external guardrail reads it.
    pub(super) answer_wait: Option<super::guard::GuardWait>,
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
            guard_wait: None,
            cache_wait: None,
            answer_wait: None,
        }
    }

    /// The provider an answer without an inline attempt comes from: the
    /// first target's, or a stored-object call's.
    pub(super) fn answering_provider(&self) -> Option<usize> {
        match self.req.route {
            Some(m) => self.config.models.get(m).map(|r| r.provider),
            None => self.req.account_provider,
        }
    }

    /// The request is served without the upstream half: failover is off,
    /// or one target remained.
    pub(super) fn serves_alone(&self) -> bool {
        !self.chains || matches!(self.forward, Forward::Inline(_))
    }
}

// ---- one attempt ----------------------------------------------------------

/// Where an attempt runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Place {
    /// In the listener half, for its only target, sent to this cluster.
    Inline(ClusterChoice),
    /// In the upstream half, on one try of a chain.
    Upstream,
}

/// One attempt at one target (see `attempt.rs`).
pub struct Attempt {
    pub(super) config: Rc<Config>,
    pub(super) place: Place,
    pub(super) phase: Phase,
    /// The API the caller speaks; errors go back in its shape.
    pub(super) caller: Schema,
    pub(super) operation: Operation,
    /// Upstream: the plan the listener half left.
    pub(super) plan: Option<Plan>,
    /// The target this attempt is at.
    pub(super) target: Option<usize>,
    /// Which attempt of the request this is (1-based).
    pub(super) number: u32,
    /// When the attempt started (inline: the request), in µs.
    pub(super) started_us: u64,
    /// Inline at the first position's cluster: why the target was chosen,
    /// named on the answer as an upstream half would.
    pub(super) route_reason: Option<String>,
    /// Whether the outcome reached the target's health record (and the
    /// attempt metrics) yet.
    pub(super) outcome_recorded: bool,
    /// With health: how the attempt at the provider ended.
    pub(super) end: Option<AttemptEnd>,
    pub(super) exchange: Option<Exchange>,
    /// The answer as it passes.
    pub(super) answer: Answer,
    /// The token counts the provider reported.
    pub(super) usage: Option<Usage>,
    /// Inline: the caller's guardrails on a complete answer (the answer is
    /// then held whole).
    pub(super) answer_guard: Vec<usize>,
    /// What they decided, for the listener half to count and log.
    pub(super) guard_decisions: Vec<crate::guard::screen::Decision>,
    /// Inline: the caller's guardrails on a streamed answer.
    pub(super) stream_guard: Option<crate::guard::stream::StreamGuard>,
}

impl Attempt {
    /// The upstream half's attempt; its target comes with the plan.
    pub fn upstream(config: Rc<Config>) -> Self {
        Attempt {
            config,
            place: Place::Upstream,
            phase: Phase::Start,
            caller: Schema::OpenAi,
            operation: Operation::ChatCompletions,
            plan: None,
            target: None,
            number: 0,
            started_us: 0,
            route_reason: None,
            outcome_recorded: false,
            end: None,
            exchange: None,
            answer: Answer::default(),
            usage: None,
            answer_guard: Vec::new(),
            guard_decisions: Vec::new(),
            stream_guard: None,
        }
    }

    /// The listener half's own attempt at its only target.
    pub(super) fn inline(
        config: Rc<Config>,
        caller: Schema,
        operation: Operation,
        cluster: ClusterChoice,
        target: usize,
        started_us: u64,
        route_reason: Option<String>,
    ) -> Self {
        Attempt {
            place: Place::Inline(cluster),
            phase: Phase::Forwarded,
            caller,
            operation,
            target: Some(target),
            number: 1,
            started_us,
            route_reason,
            ..Attempt::upstream(config)
        }
    }

    pub(super) fn route(&self) -> Option<&ModelRoute> {
        self.target.map(|i| &self.config.models[i])
    }

    pub(super) fn provider(&self) -> Option<&Provider> {
        self.route().map(|r| &self.config.providers[r.provider])
    }

    /// The API the provider answers in: the exchange's, else the target's.
    pub(super) fn provider_schema(&self) -> Schema {
        match (&self.exchange, self.route()) {
            (Some(x), _) => x.provider,
            (None, Some(r)) => r.schema,
            (None, None) => Schema::OpenAi,
        }
    }

    /// The attempt feeds the target's health record: every upstream one,
    /// and an inline one where failover is on.
    pub(super) fn records_health(&self) -> bool {
        matches!(
            self.place,
            Place::Upstream | Place::Inline(ClusterChoice::FirstPosition)
        )
    }
}

/// Which cluster an inline attempt is sent to (upstream, Envoy chose).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ClusterChoice {
    /// Failover off: the provider's own cluster.
    Provider,
    /// Failover on, one target: the first position's cluster, whose load
    /// balancer picks the provider named in the position header.
    FirstPosition,
}

/// How one attempt at a provider ended, for the target's health and the
/// `error_type` of `meshllm_attempts_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AttemptEnd {
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
    pub(super) fn error_type(self) -> Option<String> {
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
    pub(super) fn of_envoy_reply(status: u16, details: Option<&str>) -> Option<AttemptEnd> {
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
