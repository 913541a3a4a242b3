//! The narrow interface between the filter logic and the proxy.
//!
//! Everything the request path needs from Envoy goes through `Host`, so the
//! logic compiles and is tested natively against a mock, and the proxy-wasm
//! glue stays a thin adapter that handles every host-call result.

use std::fmt;

use crate::metrics::Labels;

pub mod callout;
#[cfg(test)]
pub mod mock;

pub use callout::{Callout, CalloutAnswer, CalloutId, CalloutKind, DetachedHandler};

/// A host call failed; the proxy refused or could not perform it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostError(pub String);

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub type HostResult<T = ()> = Result<T, HostError>;

pub trait Host: SharedData {
    fn request_header(&self, name: &str) -> Option<String>;
    /// The names of every request header, in one host call (cheaper than
    /// probing many names one by one).
    fn request_header_names(&self) -> HostResult<Vec<String>>;
    fn set_request_header(&mut self, name: &str, value: &str) -> HostResult;
    fn remove_request_header(&mut self, name: &str) -> HostResult;
    /// The buffered request body (the first `size` bytes).
    fn request_body(&self, size: usize) -> HostResult<Vec<u8>>;
    /// Replaces the first `old_size` buffered bytes of the request body.
    fn replace_request_body(&mut self, old_size: usize, body: &[u8]) -> HostResult;

    fn response_header(&self, name: &str) -> Option<String>;
    /// The names of every response header, in one host call (cheaper than
    /// probing or removing many names one by one).
    fn response_header_names(&self) -> HostResult<Vec<String>>;
    fn set_response_header(&mut self, name: &str, value: &str) -> HostResult;
    fn remove_response_header(&mut self, name: &str) -> HostResult;
    fn response_body(&self, size: usize) -> HostResult<Vec<u8>>;
    fn replace_response_body(&mut self, old_size: usize, body: &[u8]) -> HostResult;
    /// Envoy's `response.code_details`: `via_upstream` when the provider
    /// answered, something else when Envoy itself did.
    fn response_code_details(&self) -> Option<String>;

    /// Answers the request from the filter; nothing is sent upstream.
    fn send_response(&mut self, status: u16, headers: &[(&str, &str)], body: &[u8]) -> HostResult;

    /// Seconds since the Unix epoch, from the proxy's clock.
    fn now_unix_seconds(&self) -> u64 {
        self.now_unix_millis() / 1000
    }
    fn now_unix_millis(&self) -> u64 {
        self.now_unix_micros() / 1000
    }
    /// Microseconds since the Unix epoch, for latencies.
    fn now_unix_micros(&self) -> u64;

    /// A stream property: filter state the other half of the filter set,
    /// the chosen upstream host's metadata, ...
    fn property(&self, path: &[&str]) -> Option<Vec<u8>>;
    /// Sets filter state, which lives as long as the request and is seen by
    /// the upstream half of the filter on every attempt.
    fn set_property(&mut self, path: &[&str], value: &[u8]) -> HostResult;

    /// Adds `delta` to the counter called `name`.
    fn count(&mut self, name: &str, delta: u64);
    /// Sets the gauge called `name`.
    fn gauge(&mut self, name: &str, value: u64);
    /// Records one value in the histogram called `name`.
    fn histogram(&mut self, name: &str, value: u64);

    /// Labelled metrics: `metric` with the request's `labels` and `extra`
    /// ones. An adapter whose host has labels natively overrides these;
    /// by default the labels travel inside the name (see `metrics.rs`).
    fn count_labelled(
        &mut self,
        metric: &str,
        labels: &Labels,
        extra: &[(&str, &str)],
        delta: u64,
    ) {
        self.count(&labels.name(metric, extra), delta);
    }
    fn gauge_labelled(
        &mut self,
        metric: &str,
        labels: &Labels,
        extra: &[(&str, &str)],
        value: u64,
    ) {
        self.gauge(&labels.name(metric, extra), value);
    }
    fn histogram_labelled(
        &mut self,
        metric: &str,
        labels: &Labels,
        extra: &[(&str, &str)],
        value: u64,
    ) {
        self.histogram(&labels.name(metric, extra), value);
    }

    /// Starts a call on behalf of this request; its answer (or its
    /// timeout) reaches the filter's `on_callout`, after which the paused
    /// request is resumed with `resume_request` / `resume_response`. Envoy
    /// cancels the call if the request ends first.
    fn call_out(&mut self, call: &Callout) -> HostResult<CalloutId>;
    /// Starts a call on behalf of the root context, which outlives the
    /// request: `then` runs with its answer even after the request ended.
    fn call_out_detached(&mut self, call: &Callout, then: DetachedHandler)
        -> HostResult<CalloutId>;
    /// Asks for a tick of the root context in about `ms` (housekeeping
    /// such as returning idle leases; see `quota/lease.rs`).
    fn wake_root_in(&mut self, ms: u64) -> HostResult;
    /// Lets a request paused in a request callback go on.
    fn resume_request(&mut self) -> HostResult;
    /// Lets a request paused in a response callback go on.
    fn resume_response(&mut self) -> HostResult;
}

/// Proxy-wide key/value memory shared by every worker thread (proxy-wasm
/// shared data). Values never expire, so callers keep their key sets bounded.
pub trait SharedData {
    /// The value under `key` and its compare-and-swap token.
    fn shared_get(&self, key: &str) -> Option<(Vec<u8>, u32)>;
    /// Stores `value`; with `cas`, only if nobody wrote since that token was
    /// read. `Ok(false)` means another writer won and the caller should retry.
    fn shared_set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> HostResult<bool>;
}
