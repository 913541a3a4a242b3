//! Admit stage, listener half: quotas and budgets decide whether the
//! request may go, and to which of its targets (`quota/admission.rs`
//! decides; a refusal is a 429 in the caller's shape).
//!
//! The stage may first ask another service ([`AdmitCall`]): it then
//! defers on that call, the request pauses, and the Router resumes the
//! remaining stages when the answer (or the timeout) comes.

use std::rc::Rc;

use super::route::Routed;
use super::router::Router;
use crate::core::api_error::ApiError;
use crate::host::{CalloutAnswer, CalloutId, Host};
use crate::metrics;
use crate::quota::admission::{self, Ask, Who};

/// A question the admit stage asks another service before its own quota
/// decision (a cluster-wide quota store, for one). No production step is
/// installed yet; the seam is exercised by the pipeline's tests.
pub trait AdmitCall {
    /// Starts the call for this request (`Host::call_out`); None when this
    /// request need not ask. An error refuses the request.
    fn start(
        &self,
        host: &mut dyn Host,
        who: &Who,
        ask: &Ask,
    ) -> Result<Option<CalloutId>, ApiError>;
    /// Reads the answer: Ok lets the local decision follow; an error
    /// refuses the request (in the caller's shape).
    fn answered(&self, answer: &CalloutAnswer) -> Result<(), ApiError>;
}

/// What the admit stage decided.
pub(super) enum Admit {
    /// The targets that may serve, in attempt order.
    Chain(Vec<usize>),
    /// Waiting for the answer to this call.
    Deferred(CalloutId),
}

impl Router {
    fn ask<'a>(&self, body_len: usize, routed: &'a Routed) -> Ask<'a> {
        Ask {
            body_len,
            max_output: routed.max_output,
            chain: &routed.candidates,
            routes: &routed.routes,
            max_targets: if self.chains {
                self.config.failover.max_attempts
            } else {
                1
            },
            caller_schema: self.req.caller,
        }
    }

    /// The admit stage: the installed call first, if any, else the local
    /// decision at once.
    pub(super) fn admit(
        &mut self,
        host: &mut dyn Host,
        body_len: usize,
        routed: &Routed,
    ) -> Result<Admit, ApiError> {
        if let Some(step) = self.admit_call.clone() {
            let ask = self.ask(body_len, routed);
            if let Some(id) = step.start(host, &self.req.who, &ask)? {
                return Ok(Admit::Deferred(id));
            }
        }
        self.admit_here(host, body_len, routed).map(Admit::Chain)
    }

    /// The admit stage resumed with the answer it deferred on.
    pub(super) fn admit_answered(
        &mut self,
        host: &mut dyn Host,
        answer: &CalloutAnswer,
        body_len: usize,
        routed: &Routed,
    ) -> Result<Vec<usize>, ApiError> {
        if let Some(step) = self.admit_call.clone() {
            step.answered(answer)?;
        }
        self.admit_here(host, body_len, routed)
    }

    /// This proxy's own quota decision: reserves, or refuses with a 429.
    fn admit_here(
        &mut self,
        host: &mut dyn Host,
        body_len: usize,
        routed: &Routed,
    ) -> Result<Vec<usize>, ApiError> {
        let config = Rc::clone(&self.config);
        let ask = self.ask(body_len, routed);
        let rules = self.req.applied.rules();
        match admission::admit(&config, host, &self.req.who, &ask, rules) {
            Ok(mut admitted) => {
                if let Some(a) = &mut admitted.admission {
                    self.req.answer_headers.append(&mut a.headers);
                    self.req.quota_decision = "admitted".into();
                }
                self.req.admission = admitted.admission;
                if !admitted.over_quota.is_empty() {
                    let names: Vec<&str> = admitted
                        .over_quota
                        .iter()
                        .map(|&m| config.models[m].name.as_str())
                        .collect();
                    self.req.reason =
                        Some(format!("{};over_quota={}", routed.reason, names.join(",")));
                }
                Ok(admitted.chain)
            }
            Err(refused) => {
                let (ns, svc) = self.req.who.names();
                let labels = metrics::caller(ns, svc).with(
                    "gen_ai_request_model",
                    self.req.request_model.as_deref().unwrap_or("none"),
                );
                host.count_labelled(
                    metrics::QUOTA_REJECTIONS_TOTAL,
                    &labels,
                    &[("limit", &refused.rule), ("reason", refused.reason)],
                    1,
                );
                self.req.quota_decision = format!("rejected:{}:{}", refused.rule, refused.reason);
                self.req.answer_headers.extend(refused.headers);
                Err(refused.error)
            }
        }
    }
}
