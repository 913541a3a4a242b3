//! Admit stage, listener half: quotas and budgets decide whether the
//! request may go, and to which of its targets (`quota/admission.rs`
//! decides; a refusal is a 429 in the caller's shape).
//!
//! Rules shared across proxies are counted in a store (`quota/store.rs`):
//! the stage then defers on the store's call, the request pauses, and the
//! Router resumes the remaining stages when the answer (or the timeout)
//! comes.

use std::rc::Rc;

use super::flow::internal;
use super::state::{Routed, Router};
use crate::core::api_error::ApiError;
use crate::host::{CalloutAnswer, CalloutId, Host};
use crate::metrics;
use crate::quota::admission::{self, Ask, Rejection, StoreStep};

/// What the admit stage decided.
pub(super) enum Admit {
    /// The targets that may serve, in attempt order.
    Chain(Vec<usize>),
    /// Waiting for the answer to this call; the targets that may serve
    /// if the answer admits.
    Deferred(CalloutId, Vec<usize>),
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

    /// The admit stage: reserves, asks the shared store when a shared rule
    /// applies (deferring), or refuses with a 429.
    pub(super) fn admit(
        &mut self,
        host: &mut dyn Host,
        body_len: usize,
        routed: &Routed,
    ) -> Result<Admit, ApiError> {
        let config = Rc::clone(&self.config);
        let ask = self.ask(body_len, routed);
        let rules = self.req.applied.rules();
        match admission::admit(&config, host, &self.req.who, &ask, rules) {
            Ok(mut admitted) => {
                if let Some(a) = &mut admitted.admission {
                    self.req.answer_headers.append(&mut a.headers);
                    self.req.quota_decision = "admitted".into();
                }
                let awaited = admitted.admission.as_ref().and_then(|a| a.awaited_call());
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
                Ok(match awaited {
                    Some(call) => Admit::Deferred(call, admitted.chain),
                    None => Admit::Chain(admitted.chain),
                })
            }
            Err(refused) => Err(self.quota_refused(host, *refused)),
        }
    }

    /// The admit stage resumed with the store's answer to `id`: the targets
    /// to forward to, still waiting (the script went again, whole: the
    /// call to wait for now), or a refusal.
    pub(super) fn admit_answered(
        &mut self,
        host: &mut dyn Host,
        id: CalloutId,
        answer: &CalloutAnswer,
    ) -> Result<Option<CalloutId>, ApiError> {
        let Some(admission) = self.req.admission.take() else {
            return Err(internal(
                "a request waiting for the quota store has no reservation".into(),
            ));
        };
        let config = Rc::clone(&self.config);
        match admission::on_store_answer(&config, host, &self.req.who, admission, id, answer) {
            Ok(StoreStep::Waiting(a)) => {
                let call = a.awaited_call();
                self.req.admission = Some(a);
                Ok(call)
            }
            Ok(StoreStep::Go(mut a)) => {
                self.req.answer_headers.append(&mut a.headers);
                self.req.admission = Some(a);
                Ok(None)
            }
            Err(refused) => Err(self.quota_refused(host, *refused)),
        }
    }

    /// Counts a quota refusal and keeps its headers for the 429.
    fn quota_refused(&mut self, host: &mut dyn Host, refused: Rejection) -> ApiError {
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
        refused.error
    }
}
