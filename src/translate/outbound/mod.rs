//! Provider side: the provider APIs other than the pivot, each written from
//! the typed pivot request (`pivot::ChatRequest`) and read back into the
//! pivot. A new provider API is one file here implementing
//! [`ProviderTranslator`], and one arm in `exchange::provider_translator`.

pub mod anthropic;
pub mod bedrock;
pub mod gemini;

pub use anthropic::Anthropic;
pub use bedrock::Bedrock;
pub use gemini::Gemini;

use serde::Serialize;

use crate::core::api_error::ApiError;
use crate::translate::pivot::ChatRequest;
use crate::translate::StreamTranslator;

/// What the request is for, beyond the caller's body.
pub struct Upstream<'a> {
    /// The provider's model name.
    pub model: &'a str,
    /// The answer limit when the caller sets none (APIs that require one).
    pub default_max_tokens: u64,
}

/// One provider API to and from the pivot.
pub trait ProviderTranslator {
    /// The pivot request as the provider's request body.
    fn request_from_pivot(
        &self,
        chat: &ChatRequest<'_>,
        upstream: &Upstream<'_>,
    ) -> Result<Vec<u8>, ApiError>;
    /// A complete answer as a pivot `chat.completion`; `model` names it
    /// where the provider does not.
    fn answer_to_pivot(&self, body: &[u8], model: &str, created: u64) -> Result<Vec<u8>, String>;
    /// The status a caller sees for the provider's error status.
    fn caller_status(&self, status: u16, error_type: Option<&str>) -> u16;
    /// An error body as a pivot (OpenAI-shaped) error.
    fn error_to_pivot(&self, status: u16, error_type: Option<&str>, body: &[u8]) -> Vec<u8>;
    /// The provider's stream into the pivot stream.
    fn stream_to_pivot(
        &self,
        include_usage: bool,
        model: &str,
        created: u64,
    ) -> Box<dyn StreamTranslator>;
}

/// A provider request serialized; `api` names it in the (unexpected) error.
pub fn request_body(request: &impl Serialize, api: &str) -> Result<Vec<u8>, ApiError> {
    serde_json::to_vec(request).map_err(|e| {
        ApiError::new(
            500,
            "server_error",
            Some("gateway_error"),
            format!("Gateway error: could not serialize the {api} request: {e}."),
        )
    })
}
