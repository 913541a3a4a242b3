//! Identify stage, listener half: who is calling, the namespace policy in
//! force for them, and the internal headers a client may not send.

use std::rc::Rc;

use super::flow::internal;
use super::route::MODELS_REQUEST_HEADER;
use super::state::Router;
use crate::access::namespace_policy::{self, Applied, Source};
use crate::core::api_error::ApiError;
use crate::host::Host;
use crate::pipeline::handoff::{
    self, is_internal_request_header, CLUSTER_HEADER, ROUTER_CONTROL_HEADERS,
};
use crate::quota::admission;

impl Router {
    /// Names the caller before its credentials are stripped, and finds the
    /// namespace policy that applies to it.
    pub(super) fn identify(&mut self, host: &mut dyn Host) -> Result<(), ApiError> {
        let config = Rc::clone(&self.config);
        self.req.who = admission::identify(&config, host)?;
        let listener = host.property(namespace_policy::LISTENER_POLICY_PATH);
        let from_listener = listener.is_some();
        match namespace_policy::apply(&config, host, self.req.who.caller.as_ref(), listener) {
            Ok(applied) => self.req.applied = applied,
            Err(e) => {
                if from_listener {
                    self.req.applied.source = Source::Listener;
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Model listings: the policy of the caller, when any policy could
    /// restrict what it sees (None: the document's full list). A caller that
    /// cannot be identified sees the mesh's list.
    pub(super) fn listing_policy(
        &mut self,
        host: &mut dyn Host,
    ) -> Result<Option<Applied>, ApiError> {
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

    /// A client may not steer Envoy's router (`x-envoy-*`: retries,
    /// timeouts, ...) nor speak for the gateway's halves (`x-meshllm-*`:
    /// positions, cluster, plan): such headers would pick another target,
    /// send a request twice, or have Envoy's own refusals counted against a
    /// target's health. All are removed here, once; with chains, the
    /// caller's `x-meshllm-models` is kept aside for routing.
    pub(super) fn strip_internal_headers(&mut self, host: &mut dyn Host) -> Result<(), ApiError> {
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
            if name.eq_ignore_ascii_case(MODELS_REQUEST_HEADER) && self.chains {
                self.req.extra_models = host.request_header(name);
            }
            host.remove_request_header(name).map_err(|e| {
                internal(format!("could not remove the request header {name}: {e}"))
            })?;
        }
        if listed {
            self.req.entry_headers = Some(names);
        }
        Ok(())
    }
}
