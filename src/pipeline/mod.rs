//! One request through the gateway: the filter's callbacks, for the
//! listener half and the upstream half, and the encoding of what one half
//! hands the other.

pub mod filter;
pub mod wire;
