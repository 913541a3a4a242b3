//! The API schemas the gateway speaks. Callers, providers, routing, pricing
//! and admission all name them, so they live below every one of those.

/// The API schemas the gateway speaks, on either side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Schema {
    /// OpenAI Chat Completions (also Azure OpenAI and OpenAI-compatibles).
    OpenAi,
    /// Anthropic Messages (also on Vertex AI).
    Anthropic,
    /// Google Gemini generateContent (also on Vertex AI).
    Gemini,
    /// AWS Bedrock Converse.
    Converse,
    /// OpenAI Responses (`POST /v1/responses`): a caller API; OpenAI and
    /// Azure OpenAI serve it as themselves.
    Responses,
}
