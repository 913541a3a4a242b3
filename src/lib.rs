//! meshllm: an LLM gateway that runs inside Envoy as a proxy-wasm filter.
//!
//! The logic lives in plain modules that compile and test natively; only
//! `glue` touches the proxy-wasm ABI, and only when built for wasm32.

// The VM must never trap: no unwrap/expect/panic outside tests.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod access;
pub mod cache;
pub mod config;
pub mod core;
pub mod guard;
pub mod host;
pub mod metrics;
pub mod pipeline;
pub mod providers;
pub mod quota;
pub mod routing;
pub mod translate;

// The host ABI only exists inside the VM: native test binaries never link the
// glue, but clippy checks it everywhere.
#[cfg(any(target_arch = "wasm32", clippy))]
mod glue;

// The native adapter exists only in the native build (`--features native`).
#[cfg(any(feature = "native", clippy))]
pub mod native;
