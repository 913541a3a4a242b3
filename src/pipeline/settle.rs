//! Settle stage, per attempt: how the attempt ended goes to the target's
//! health record (`routing/health.rs`) and `meshllm_attempts_total`; the
//! upstream half hands the usage it read to the listener half
//! (`handoff.rs`).

use super::answer::ResponseMode;
use super::state::{Attempt, AttemptEnd, Place};
use crate::config::Config;
use crate::core::usage::Usage;
use crate::host::Host;
use crate::metrics;
use crate::pipeline::handoff::{self, Plan};
use crate::routing::health::{self, HealthPolicy, Outcome};

/// The upstream connection's local address: absent when none was made.
const UPSTREAM_LOCAL_ADDRESS: &[&str] = &["upstream", "local_address"];
/// Why the upstream connection failed (refused, TLS), when it did.
const UPSTREAM_TRANSPORT_FAILURE: &[&str] = &["upstream", "transport_failure_reason"];

/// An attempt's labels: the caller and requested model from the plan, the
/// target's provider and model.
pub(super) fn attempt_labels(config: &Config, plan: &Plan, target: usize) -> metrics::Labels {
    let route = &config.models[target];
    let (ns, svc, model) = &plan.labels;
    metrics::call_labels(
        ns,
        svc,
        plan.operation.name(),
        &config.providers[route.provider].name,
        model,
        &route.upstream_model,
    )
}

impl Attempt {
    /// Feeds the target's health record and `meshllm_attempts_total` with
    /// how the attempt ended.
    pub(super) fn record_outcome(&mut self, host: &mut dyn Host, end: AttemptEnd) {
        let Some(route) = self.target else { return };
        self.outcome_recorded = true;
        self.end = Some(end);
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

    /// Upstream: `meshllm_attempts_total` for this attempt's outcome (the
    /// listener half counts its inline attempt when it finishes).
    pub(super) fn count_attempt(&self, host: &mut dyn Host, end: AttemptEnd) {
        let (Some(plan), Some(target)) = (&self.plan, self.target) else {
            return;
        };
        let labels = attempt_labels(&self.config, plan, target);
        match end.error_type() {
            Some(e) => {
                host.count_labelled(metrics::ATTEMPTS_TOTAL, &labels, &[("error_type", &e)], 1)
            }
            None => host.count_labelled(metrics::ATTEMPTS_TOTAL, &labels, &[], 1),
        }
    }

    /// The attempt ended with no response at all. Envoy says why only in
    /// the upstream connection's state: no connection (refused,
    /// unreachable, TLS failure), or one that was reset, or closed when the
    /// per-try timeout fired. `None` when the caller went away first: that
    /// says nothing about the provider.
    pub(super) fn unanswered(&self, host: &dyn Host) -> Option<AttemptEnd> {
        if let Some(details) = host.response_code_details() {
            if !details.starts_with("upstream_") {
                return None;
            }
        }
        // An attempt that lasted the per-try timeout hit it. Envoy's timers
        // run on the event loop's cached clock and fire up to tens of ms
        // early by this half's reading: a tenth of the timeout is allowed.
        let elapsed_ms = host.now_unix_micros().saturating_sub(self.started_us) / 1000;
        let timeout_ms = self.config.failover.per_try_timeout_ms;
        let timed_out = elapsed_ms + timeout_ms / 10 >= timeout_ms;
        let local = host.property(UPSTREAM_LOCAL_ADDRESS);
        let failure = host.property(UPSTREAM_TRANSPORT_FAILURE);
        // Without any connection state (the native build's upstream filter
        // cannot see the attempt's connection) only the clock can tell.
        if local.is_none() && failure.is_none() && timed_out {
            return Some(AttemptEnd::Timeout);
        }
        if local.is_none() || failure.is_some() {
            return Some(AttemptEnd::ConnectFailure);
        }
        if timed_out {
            Some(AttemptEnd::Timeout)
        } else {
            Some(AttemptEnd::Reset)
        }
    }

    /// Keeps the provider's token counts; the upstream half also leaves
    /// them for the listener half, which settles the quota.
    pub(super) fn note_usage(&mut self, host: &mut dyn Host, usage: Option<Usage>) {
        let Some(u) = usage else { return };
        self.usage = Some(u);
        if let (Place::Upstream, Some(target)) = (self.place, self.target) {
            if let Err(e) = handoff::leave_usage(host, target, &u) {
                log::warn!("could not leave the usage for the listener filter: {e}");
            }
        }
    }

    /// The usage the answer reported, a stream's read at its end if it was
    /// not noted yet.
    pub(super) fn final_usage(&mut self) -> Option<Usage> {
        if self.usage.is_none() {
            if let ResponseMode::Stream(t) = &self.answer.mode {
                self.usage = t.usage();
            }
        }
        self.usage
    }
}
