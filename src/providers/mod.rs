//! What each kind of provider is, apart from any configuration: its name in
//! the config, where it lives by default, and the fixed parts of its API
//! (version header, request paths) that the config compiles into routes.
//! `aws/` holds what talking to Bedrock takes beyond that.
//!
//! `envoy/tools/providers.json` is the same table for the Python tools
//! (default URLs, credential variables, paths), generated from this code by
//! a test (`config/provider_table_tests.rs`) that fails while the two differ.

use crate::core::url::percent_encode;

pub mod aws;

/// The kinds of provider a config can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    OpenAi,
    AzureOpenAi,
    OpenAiCompatible,
    /// Anthropic Messages API.
    Anthropic,
    /// Google Gemini API (generativelanguage.googleapis.com).
    Gemini,
    /// Google Vertex AI: Gemini models, and Anthropic models through
    /// `rawPredict`, under a project and region.
    VertexAi,
    /// AWS Bedrock Converse / ConverseStream, signed with SigV4.
    Bedrock,
}

impl ProviderKind {
    pub const NAMES: &'static str =
        "openai, azure_openai, openai_compatible, anthropic, gemini, vertex_ai, bedrock";

    /// The kind as the config spells it.
    pub fn name(self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "openai",
            ProviderKind::AzureOpenAi => "azure_openai",
            ProviderKind::OpenAiCompatible => "openai_compatible",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Gemini => "gemini",
            ProviderKind::VertexAi => "vertex_ai",
            ProviderKind::Bedrock => "bedrock",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "openai" => Some(ProviderKind::OpenAi),
            "azure_openai" => Some(ProviderKind::AzureOpenAi),
            "openai_compatible" => Some(ProviderKind::OpenAiCompatible),
            "anthropic" => Some(ProviderKind::Anthropic),
            "gemini" => Some(ProviderKind::Gemini),
            "vertex_ai" => Some(ProviderKind::VertexAi),
            "bedrock" => Some(ProviderKind::Bedrock),
            _ => None,
        }
    }
}

/// The base URL a kind uses when `base_url` is not set.
pub fn default_base_url(kind: ProviderKind, region: Option<&str>) -> Option<String> {
    match (kind, region) {
        (ProviderKind::OpenAi, _) => Some("https://api.openai.com/v1".into()),
        (ProviderKind::Anthropic, _) => Some("https://api.anthropic.com/v1".into()),
        (ProviderKind::Gemini, _) => {
            Some("https://generativelanguage.googleapis.com/v1beta".into())
        }
        (ProviderKind::VertexAi, Some("global")) => {
            Some("https://aiplatform.googleapis.com/v1".into())
        }
        (ProviderKind::VertexAi, Some(r)) => {
            Some(format!("https://{r}-aiplatform.googleapis.com/v1"))
        }
        (ProviderKind::Bedrock, Some(r)) => {
            Some(format!("https://bedrock-runtime.{r}.amazonaws.com"))
        }
        _ => None,
    }
}

/// The `anthropic-version` header value the gateway sends.
pub const DEFAULT_ANTHROPIC_VERSION: &str = "2023-06-01";

/// The request path for a model id (a plain id, an inference profile id or
/// an ARN): `/model/{id}/converse` or `/model/{id}/converse-stream`, the id
/// percent-encoded whole (`:` -> `%3A`, `/` -> `%2F`; only RFC 3986
/// unreserved characters stay). Sign exactly this path with
/// [`crate::providers::aws::sigv4::sign`].
pub fn converse_path(model_id: &str, stream: bool) -> String {
    let method = if stream {
        "converse-stream"
    } else {
        "converse"
    };
    format!("/model/{}/{method}", percent_encode(model_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converse_paths() {
        assert_eq!(
            converse_path("anthropic.claude-3-5-sonnet-20240620-v1:0", false),
            "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse"
        );
        assert_eq!(
            converse_path("us.meta.llama3-2-1b-instruct-v1:0", true),
            "/model/us.meta.llama3-2-1b-instruct-v1%3A0/converse-stream"
        );
        assert_eq!(
            converse_path(
                "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.x-v1:0",
                false
            ),
            "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2Fus.x-v1%3A0/converse"
        );
        assert_eq!(
            converse_path("a b?#%", false),
            "/model/a%20b%3F%23%25/converse"
        );
    }
}
