//! Provider side: the provider APIs other than the pivot, each written from
//! the typed pivot request (`pivot::ChatRequest`) and read back into the
//! pivot. A new provider API is one file here implementing
//! [`ProviderTranslator`], and one arm in `exchange::provider_translator`.

pub mod anthropic;
pub mod bedrock;
pub mod gemini;

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
pub trait ProviderTranslator: Sync {
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

/// Anthropic Messages (also on Vertex AI).
pub struct Anthropic;
/// Gemini `generateContent` (also on Vertex AI).
pub struct Gemini;
/// AWS Bedrock Converse.
pub struct Bedrock;

impl ProviderTranslator for Anthropic {
    fn request_from_pivot(
        &self,
        chat: &ChatRequest<'_>,
        upstream: &Upstream<'_>,
    ) -> Result<Vec<u8>, ApiError> {
        anthropic::messages_request(chat, upstream.model, upstream.default_max_tokens)
    }
    fn answer_to_pivot(&self, body: &[u8], _model: &str, created: u64) -> Result<Vec<u8>, String> {
        anthropic::messages_response_to_chat(body, created)
    }
    fn caller_status(&self, status: u16, _error_type: Option<&str>) -> u16 {
        anthropic::caller_status(status)
    }
    fn error_to_pivot(&self, status: u16, _error_type: Option<&str>, body: &[u8]) -> Vec<u8> {
        anthropic::messages_error_to_chat(status, body)
    }
    fn stream_to_pivot(
        &self,
        include_usage: bool,
        _model: &str,
        created: u64,
    ) -> Box<dyn StreamTranslator> {
        Box::new(anthropic::MessagesStreamToChat::new(include_usage, created))
    }
}

impl ProviderTranslator for Gemini {
    fn request_from_pivot(
        &self,
        chat: &ChatRequest<'_>,
        _upstream: &Upstream<'_>,
    ) -> Result<Vec<u8>, ApiError> {
        gemini::generate_content_request(chat)
    }
    fn answer_to_pivot(&self, body: &[u8], model: &str, created: u64) -> Result<Vec<u8>, String> {
        gemini::gemini_response_to_chat(body, model, created)
    }
    fn caller_status(&self, status: u16, _error_type: Option<&str>) -> u16 {
        gemini::caller_status(status)
    }
    fn error_to_pivot(&self, status: u16, _error_type: Option<&str>, body: &[u8]) -> Vec<u8> {
        gemini::gemini_error_to_chat(status, body)
    }
    fn stream_to_pivot(
        &self,
        include_usage: bool,
        model: &str,
        created: u64,
    ) -> Box<dyn StreamTranslator> {
        Box::new(gemini::GeminiStreamToChat::new(
            include_usage,
            model,
            created,
        ))
    }
}

impl ProviderTranslator for Bedrock {
    fn request_from_pivot(
        &self,
        chat: &ChatRequest<'_>,
        upstream: &Upstream<'_>,
    ) -> Result<Vec<u8>, ApiError> {
        bedrock::converse_request(chat, Some(upstream.default_max_tokens))
    }
    fn answer_to_pivot(&self, body: &[u8], model: &str, created: u64) -> Result<Vec<u8>, String> {
        bedrock::converse_response_to_chat(body, model, created)
    }
    fn caller_status(&self, status: u16, error_type: Option<&str>) -> u16 {
        bedrock::caller_status(status, error_type)
    }
    fn error_to_pivot(&self, status: u16, error_type: Option<&str>, body: &[u8]) -> Vec<u8> {
        bedrock::converse_error_to_chat(status, error_type, body)
    }
    fn stream_to_pivot(
        &self,
        include_usage: bool,
        model: &str,
        created: u64,
    ) -> Box<dyn StreamTranslator> {
        Box::new(bedrock::ConverseStreamToChat::new(
            include_usage,
            model,
            created,
        ))
    }
}
