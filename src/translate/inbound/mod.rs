//! Caller side: the APIs callers speak other than the pivot, each read into
//! the OpenAI Chat pivot and written back from it. A new caller API is one
//! file here implementing [`CallerTranslator`], and one arm in
//! `exchange::caller_translator`.

pub mod anthropic;
pub mod gemini;
pub mod responses;

pub use anthropic::Anthropic;
pub use gemini::Gemini;
pub use responses::Responses;

use crate::core::api_error::ApiError;
use crate::translate::StreamTranslator;

/// One caller API to and from the pivot.
pub trait CallerTranslator {
    /// The caller's request body as a pivot (OpenAI Chat) request for
    /// `upstream_model`. `stream` is what the caller asked for where the
    /// body does not say it (Gemini puts it in the URL).
    fn request_to_pivot(
        &self,
        body: &[u8],
        upstream_model: &str,
        stream: bool,
    ) -> Result<Vec<u8>, ApiError>;
    /// A complete pivot answer in the caller's shape.
    fn answer_from_pivot(&self, pivot: &[u8]) -> Result<Vec<u8>, String>;
    /// An error the gateway raises itself, in the caller's shape.
    fn error_body(&self, error: &ApiError) -> Vec<u8>;
    /// A pivot (OpenAI-shaped) error body in the caller's shape.
    fn error_from_pivot(&self, status: u16, pivot: &[u8]) -> Vec<u8>;
    /// The pivot stream into the caller's. `reads_pivot`: it reads the
    /// gateway's own pivot (behind a provider-side translator), whose events
    /// may be a little larger than a provider's.
    fn stream_from_pivot(&self, reads_pivot: bool) -> Box<dyn StreamTranslator>;
}
