//! What talking to AWS takes without an SDK: SHA-256/HMAC, SigV4 request
//! signing, and the event-stream binary framing of streamed responses.

pub mod eventstream;
pub mod sha256;
pub mod sigv4;
