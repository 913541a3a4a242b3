//! Translation between the OpenAI API that callers speak and the native APIs
//! of providers that do not speak it.
//!
//! Everything here is pure: bytes in, bytes out, no host calls, so the filter
//! decides when to call it and the logic is tested natively.

pub mod anthropic;
