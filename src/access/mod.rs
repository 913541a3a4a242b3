//! Who is calling, and what they may use: the caller's identity from what
//! the mesh vouches for, and the namespace policy that applies to them.

pub mod identity;
pub mod namespace_policy;
