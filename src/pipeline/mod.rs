//! One request through the gateway: the filter's callbacks, for the
//! listener half and the upstream half (`filter`), everything one half
//! hands the other (`handoff`) and its binary encoding (`wire`).

pub mod filter;
pub mod handoff;
pub mod wire;

#[cfg(test)]
mod shared_quota_tests;
