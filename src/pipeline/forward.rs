//! Forward stage, listener half: several targets go to Envoy as a chain
//! (one position header per attempt, the plan in filter state through
//! `handoff.rs`); a single one is served by the Router's own inline
//! attempt.

use std::rc::Rc;

use super::flow::internal;
use super::point::{ANTHROPIC_HEADERS, CLIENT_CREDENTIAL_HEADERS};
use super::state::{Attempt, Call, Chain, ClusterChoice, Forward, Router};
use crate::config::models::Operation;
use crate::core::api_error::ApiError;
use crate::core::json::TopLevel;
use crate::host::Host;
use crate::pipeline::handoff::{
    self, Plan, CALLER_API_HEADER, CLUSTER_HEADER, FAILOVER_CLUSTER, MAX_RETRIES_HEADER,
};

impl Router {
    /// The forward stage, with the targets the admit stage kept.
    pub(super) fn forward(
        &mut self,
        host: &mut dyn Host,
        body: &[u8],
        doc: &TopLevel,
        call: &Call,
        chain: Vec<usize>,
    ) -> Result<(), ApiError> {
        let op = self.req.operation.unwrap_or(Operation::ChatCompletions);
        if self.chains && chain.len() > 1 {
            return self.hand_to_envoy(host, op, chain);
        }
        // One target: the upstream half would only repeat what this half
        // can do once, and costs a second body pass.
        let target = *chain
            .first()
            .ok_or_else(|| internal("no target was chosen".into()))?;
        self.req.route = Some(target);
        let (cluster, reason) = if self.chains {
            (ClusterChoice::FirstPosition, self.req.reason.clone())
        } else {
            (ClusterChoice::Provider, None)
        };
        let attempt = Attempt::inline(
            Rc::clone(&self.config),
            self.req.caller,
            op,
            cluster,
            target,
            self.req.started_us,
            reason,
        );
        let mut attempt = attempt;
        if call.stream {
            attempt.stream_guard = self.stream_guard();
        } else {
            attempt.answer_guard = self.req.answer_guard.clone();
        }
        let entry_headers = self.req.entry_headers.take();
        self.forward = Forward::Inline(Box::new(attempt));
        let Forward::Inline(attempt) = &mut self.forward else {
            return Err(internal("the inline attempt was not kept".into()));
        };
        attempt.prepare(host, body, doc, call, entry_headers)
    }

    /// Leaves the plan for the upstream half and names each attempt's
    /// provider for Envoy's load balancer.
    fn hand_to_envoy(
        &mut self,
        host: &mut dyn Host,
        op: Operation,
        chain: Vec<usize>,
    ) -> Result<(), ApiError> {
        let rewrite = |e: crate::host::HostError| {
            internal(format!("could not rewrite the request headers: {e}"))
        };
        let config = Rc::clone(&self.config);
        let mut anthropic = Vec::new();
        let present = self.req.client_headers(host);
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
        host.set_request_header(CALLER_API_HEADER, handoff::api_name(self.req.caller))
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
        let (ns, svc) = self.req.who.names();
        let plan = Plan {
            caller: self.req.caller,
            operation: op,
            gemini: self.req.gemini_call.clone(),
            chain,
            reason: self.req.reason.clone().unwrap_or_default(),
            anthropic,
            labels: (
                ns.to_string(),
                svc.to_string(),
                self.req.request_model.clone().unwrap_or_default(),
            ),
        };
        handoff::leave_plan(host, &plan)
            .map_err(|e| internal(format!("could not store the routing plan: {e}")))?;
        self.req.route = plan.chain.first().copied();
        self.forward = Forward::Chain(Chain {
            plan,
            served: None,
            attempts: 0,
        });
        Ok(())
    }
}
