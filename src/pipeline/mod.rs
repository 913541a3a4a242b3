//! One request through the gateway, as a pipeline of stages over one
//! request state.
//!
//! The listener half is a [`Router`]: `endpoint` → `identify` → `route` →
//! `admit` → `forward`. It either hands Envoy a chain of targets, whose
//! every try the upstream half serves as an upstream [`Attempt`], or runs
//! its one attempt inline. An attempt: `translate` → `point` (cluster,
//! authority, path, credential, signature) → `respond` → `settle`; the
//! listener half ends with `finish` (metrics, access log, quota settle).
//! `handoff` is everything one half hands the other, `wire` its encoding.
//!
//! The files read top-down: `router.rs` and `attempt.rs` run the stages in
//! order; a stage's file holds its `impl Router` / `impl Attempt` block
//! and imports only stages it calls and the leaves below all of them:
//! `state.rs` (both halves' state and its fields' types), `answer.rs`
//! (the answer as it passes), `request.rs` (the body and the call read
//! from it), `flow.rs` (what a stage answers with).

use std::rc::Rc;

use crate::config::Config;
use crate::host::{CalloutAnswer, CalloutId, Host};

mod account;
mod admit;
mod answer;
mod attempt;
mod cache;
mod endpoint;
mod finish;
mod flow;
mod forward;
mod guard;
pub mod handoff;
mod identify;
mod point;
mod request;
mod respond;
mod route;
mod router;
mod settle;
mod state;
mod translate;
pub mod wire;

pub use cache::{CACHE_RESPONSE_HEADER, LOG_CACHE};
pub use finish::{
    LOG_ATTEMPTS, LOG_CACHED_TOKENS, LOG_CALLER, LOG_COST, LOG_GUARDRAILS, LOG_INPUT_TOKENS,
    LOG_OUTPUT_TOKENS, LOG_PATH, LOG_POLICY, LOG_PROVIDER, LOG_QUOTA, LOG_REQUEST_MODEL,
    LOG_RESPONSE_MODEL, LOG_ROUTE_REASON, LOG_TAGS, LOG_TOKENS_ESTIMATED, LOG_TTFT,
};
pub use flow::{not_configured, Flow};
pub use route::{DOWNGRADE_RESPONSE_HEADER, MODELS_REQUEST_HEADER};
pub use state::{Attempt, Router};

/// The filter of one request: the listener half or the upstream half.
/// The proxy glue calls its [`Half`]'s callbacks and nothing else.
// One per request, never moved after creation: boxing would only add an
// allocation.
#[allow(clippy::large_enum_variant)]
pub enum Filter {
    Listener(Router),
    Upstream(Attempt),
}

/// The callbacks of one half of the filter, as the proxy calls them.
pub trait Half {
    fn on_request_headers(&mut self, host: &mut dyn Host, end_of_stream: bool) -> Flow;
    fn on_request_body(
        &mut self,
        host: &mut dyn Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Flow;
    /// Trailers end a request whose last body chunk was not marked final.
    fn on_request_trailers(&mut self, host: &mut dyn Host, body_size: usize) -> Flow;
    fn on_response_headers(&mut self, host: &mut dyn Host, end_of_stream: bool) -> Flow;
    fn on_response_body(
        &mut self,
        host: &mut dyn Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Flow;
    /// The answer to a call this request made (see `host::callout`).
    fn on_callout(&mut self, host: &mut dyn Host, id: CalloutId, answer: CalloutAnswer);
    /// The request is over (answered, failed or abandoned).
    fn on_done(&mut self, host: &mut dyn Host);
}

impl Filter {
    /// The listener half; with failover on it may hand Envoy a chain.
    pub fn listener(config: Rc<Config>) -> Self {
        let chains = config.failover.enabled;
        Filter::Listener(Router::new(config, chains))
    }

    /// The upstream half: one attempt of a chain.
    pub fn upstream(config: Rc<Config>) -> Self {
        Filter::Upstream(Attempt::upstream(config))
    }
}

/// A filter is its half: the proxy calls the half's callbacks on it.
impl std::ops::Deref for Filter {
    type Target = dyn Half;
    fn deref(&self) -> &(dyn Half + 'static) {
        match self {
            Filter::Listener(router) => router,
            Filter::Upstream(attempt) => attempt,
        }
    }
}

impl std::ops::DerefMut for Filter {
    fn deref_mut(&mut self) -> &mut (dyn Half + 'static) {
        match self {
            Filter::Listener(router) => router,
            Filter::Upstream(attempt) => attempt,
        }
    }
}

#[cfg(test)]
#[path = "filter_tests.rs"]
mod tests;

#[cfg(test)]
mod shared_quota_tests;

#[cfg(test)]
mod lease_tests;

#[cfg(test)]
mod fuzz_tests;
