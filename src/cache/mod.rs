//! The response cache: answers to identical requests, replayed from the
//! proxy instead of asking a provider again.
//!
//! `policy.rs` is the `cache` section; `key.rs` decides whether a request
//! may be cached and names it (the normalized request and the caller's
//! scope); `entry.rs` is what is stored and whether an answer is whole
//! enough to store; `local.rs` keeps entries in the proxy's shared memory,
//! bounded. The pipeline's cache stage (`pipeline/cache.rs`) looks up,
//! replays and fills.

pub mod entry;
pub mod key;
pub mod local;
pub mod policy;
pub mod shared;
