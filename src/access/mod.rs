//! Who is calling, and what they may use.

pub mod namespace_policy;
