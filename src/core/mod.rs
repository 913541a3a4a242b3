//! The gateway's shared vocabulary: the API schemas, token usage, the error
//! every caller-facing failure becomes, and the byte-level readers (JSON
//! scanner, SSE parser) and encoders (percent-encoding, SHA-256) that the
//! rest is written with. Nothing here imports anything else of the crate.

pub mod api_error;
pub mod json;
pub mod multipart;
pub mod schema;
pub mod sha256;
pub mod sse;
pub mod url;
pub mod usage;
