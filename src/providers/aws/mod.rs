//! What talking to AWS takes without an SDK: SigV4 request signing (over
//! `core::sha256`), and the event-stream binary framing of streamed responses.

pub mod eventstream;
pub mod sigv4;
