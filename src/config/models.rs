//! The `models` section: every public model name and alias, the provider
//! and upstream model behind it, the paths its requests take, and the
//! `/v1/models` answers built from them.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::Value;

use crate::config::error::{deserialize_at, ConfigError};
use crate::config::names::valid_model_name;
use crate::config::providers::Provider;
use crate::config::routing::{
    compile_attributes, ModelAttributes, RawCapabilities, RawPrice, RoutePolicy,
};
use crate::core::json::quote;
use crate::core::schema::Schema;
use crate::core::url::percent_encode;
use crate::providers::{converse_path, ProviderKind};
use crate::quota::pricing::default_prices;

pub use crate::config::operations::{Operation, Passed};

#[derive(Debug, Clone)]
pub struct ModelRoute {
    /// The public name callers use.
    pub name: String,
    /// More public names for the same route.
    pub aliases: Vec<String>,
    pub provider: usize,
    pub upstream_model: String,
    /// `upstream_model` as a JSON string literal, ready to splice into bodies.
    pub upstream_model_json: String,
    /// The API schema the provider speaks for this model.
    pub schema: Schema,
    pub chat_path: String,
    /// Where streamed chat calls go (Gemini, Vertex and Bedrock use another
    /// method); the same as `chat_path` otherwise.
    pub chat_stream_path: String,
    /// None when the provider has no embeddings API.
    pub embeddings_path: Option<String>,
    /// Where OpenAI and Azure OpenAI serve the Responses API as themselves;
    /// None for providers reached through the chat pivot.
    pub responses_path: Option<String>,
    /// The model name a Responses body carries upstream, as a JSON string
    /// literal (Azure's v1 API names the deployment there).
    pub responses_model_json: String,
    /// The other endpoints the provider serves for this model, and where.
    pub passed_paths: Vec<(Passed, String)>,
    /// Vertex AI's Anthropic models take the model from the URL and an
    /// `anthropic_version` in the body instead.
    pub vertex_anthropic: bool,
    /// Price, capabilities and quality, for routing decisions.
    pub attributes: ModelAttributes,
}

impl ModelRoute {
    /// The name, then the aliases, as configured.
    pub fn public_names(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.name.as_str()).chain(self.aliases.iter().map(String::as_str))
    }

    pub fn path(&self, op: Operation, stream: bool) -> Option<&str> {
        match op {
            Operation::ChatCompletions if stream => Some(&self.chat_stream_path),
            Operation::ChatCompletions => Some(&self.chat_path),
            Operation::Embeddings => self.embeddings_path.as_deref(),
            Operation::Passed(p) => self
                .passed_paths
                .iter()
                .find(|(q, _)| *q == p)
                .map(|(_, path)| path.as_str()),
            Operation::Account(_) => None,
        }
    }

    /// The API this target speaks to `caller`: OpenAI and Azure OpenAI
    /// serve Responses callers as themselves, the rest through the pivot.
    pub fn schema_for(&self, caller: Schema) -> Schema {
        if caller == Schema::Responses && self.responses_path.is_some() {
            Schema::Responses
        } else {
            self.schema
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    name: String,
    provider: String,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    deployment: Option<String>,
    #[serde(default)]
    aliases: Vec<String>,
    #[serde(default)]
    publisher: Option<String>,
    #[serde(default)]
    price: Option<RawPrice>,
    #[serde(default)]
    capabilities: Option<RawCapabilities>,
    #[serde(default)]
    quality: Option<f64>,
}

type ModelTable = (Vec<ModelRoute>, HashMap<String, usize>);

pub(crate) fn compile_models(
    value: Option<&Value>,
    providers: &[Provider],
) -> Result<ModelTable, ConfigError> {
    let list = match value {
        Some(Value::Array(list)) if !list.is_empty() => list,
        Some(Value::Array(_)) | None => {
            return Err(ConfigError::new("models", "at least one model is required"))
        }
        Some(_) => return Err(ConfigError::new("models", "must be an array")),
    };
    let mut models = Vec::with_capacity(list.len());
    let mut by_name: HashMap<String, usize> = HashMap::new();
    for (i, v) in list.iter().enumerate() {
        let at = format!("models[{i}]");
        let raw: RawModel = deserialize_at(&at, v)?;
        let provider = providers
            .iter()
            .position(|p| p.name == raw.provider)
            .ok_or_else(|| {
                let known: Vec<&str> = providers.iter().map(|p| p.name.as_str()).collect();
                ConfigError::new(
                    format!("{at}.provider"),
                    format!(
                        "unknown provider {:?} (configured: {})",
                        raw.provider,
                        known.join(", ")
                    ),
                )
            })?;
        let kind = providers[provider].kind;
        for (field, name) in std::iter::once(("name".to_string(), &raw.name)).chain(
            raw.aliases
                .iter()
                .enumerate()
                .map(|(j, a)| (format!("aliases[{j}]"), a)),
        ) {
            if !valid_model_name(name) {
                return Err(ConfigError::new(
                    format!("{at}.{field}"),
                    format!("{name:?} is not a valid model name"),
                ));
            }
            if by_name.insert(name.clone(), i).is_some() {
                return Err(ConfigError::new(
                    format!("{at}.{field}"),
                    format!("model name {name:?} is already used by another entry"),
                ));
            }
        }
        let upstream_model = raw.model.clone().unwrap_or_else(|| raw.name.clone());
        if upstream_model.is_empty() || upstream_model.len() > 256 {
            return Err(ConfigError::new(
                format!("{at}.model"),
                "must be a non-empty upstream model name",
            ));
        }
        let p = &providers[provider];
        let base_path = &p.base_path;
        let mut responses = None;
        let mut passed_paths = Vec::new();
        let (chat_path, embeddings_path) = match kind {
            ProviderKind::AzureOpenAi => {
                let deployment = raw
                    .deployment
                    .clone()
                    .unwrap_or_else(|| upstream_model.clone());
                if !valid_model_name(&deployment) || deployment.contains('/') {
                    return Err(ConfigError::new(
                        format!("{at}.deployment"),
                        format!("{deployment:?} is not a valid deployment name"),
                    ));
                }
                let version = p.api_version.as_deref().unwrap_or_default();
                // Azure's v1 API takes the deployment as the body's model.
                if p.responses_api {
                    responses = Some((
                        format!("{base_path}/openai/v1/responses"),
                        quote(&deployment),
                    ));
                }
                let prefix = format!("{base_path}/openai/deployments/{deployment}");
                for p in [
                    Passed::Completions,
                    Passed::ImageGenerations,
                    Passed::ImageEdits,
                    Passed::Transcriptions,
                    Passed::Translations,
                    Passed::Speech,
                ] {
                    let rest = p.path().trim_start_matches("/v1");
                    passed_paths.push((p, format!("{prefix}{rest}?api-version={version}")));
                }
                (
                    format!("{prefix}/chat/completions?api-version={version}"),
                    Some(format!("{prefix}/embeddings?api-version={version}")),
                )
            }
            _ if raw.deployment.is_some() => {
                return Err(ConfigError::new(
                    format!("{at}.deployment"),
                    "only applies to providers of kind \"azure_openai\"",
                ))
            }
            ProviderKind::OpenAi | ProviderKind::OpenAiCompatible => {
                if p.responses_api {
                    responses = Some((format!("{base_path}/responses"), quote(&upstream_model)));
                }
                for p in Passed::ALL
                    .into_iter()
                    .filter(|p| p.caller() == Schema::OpenAi)
                {
                    let rest = p.path().trim_start_matches("/v1");
                    passed_paths.push((p, format!("{base_path}{rest}")));
                }
                (
                    format!("{base_path}/chat/completions"),
                    Some(format!("{base_path}/embeddings")),
                )
            }
            ProviderKind::Anthropic => {
                passed_paths.push((
                    Passed::CountTokens,
                    format!("{base_path}/messages/count_tokens"),
                ));
                (format!("{base_path}/messages"), None)
            }
            ProviderKind::Gemini | ProviderKind::VertexAi | ProviderKind::Bedrock => {
                (String::new(), None)
            }
        };
        if raw.publisher.is_some() && kind != ProviderKind::VertexAi {
            return Err(ConfigError::new(
                format!("{at}.publisher"),
                "only applies to providers of kind \"vertex_ai\"",
            ));
        }
        // Google paths take the model id percent-encoded, but write versioned
        // ids with a literal '@' (claude-sonnet-4-5@20250929).

        let in_path = percent_encode(&upstream_model).replace("%40", "@");
        let (schema, chat_path, chat_stream_path, vertex_anthropic) = match kind {
            ProviderKind::OpenAi | ProviderKind::OpenAiCompatible | ProviderKind::AzureOpenAi => {
                (Schema::OpenAi, chat_path.clone(), chat_path, false)
            }
            ProviderKind::Anthropic => (Schema::Anthropic, chat_path.clone(), chat_path, false),
            ProviderKind::Gemini => (
                Schema::Gemini,
                format!("{base_path}/models/{in_path}:generateContent"),
                format!("{base_path}/models/{in_path}:streamGenerateContent?alt=sse"),
                false,
            ),
            ProviderKind::VertexAi => {
                let publisher = match raw.publisher.as_deref() {
                    Some(p @ ("google" | "anthropic")) => p,
                    Some(other) => {
                        return Err(ConfigError::new(
                            format!("{at}.publisher"),
                            format!("{other:?} is not supported (expected google or anthropic)"),
                        ))
                    }
                    None if upstream_model.starts_with("claude") => "anthropic",
                    None => "google",
                };
                let prefix = format!(
                    "{base_path}/projects/{}/locations/{}/publishers/{publisher}/models/{in_path}",
                    p.project.as_deref().unwrap_or_default(),
                    p.region.as_deref().unwrap_or_default(),
                );
                if publisher == "anthropic" {
                    (
                        Schema::Anthropic,
                        format!("{prefix}:rawPredict"),
                        format!("{prefix}:streamRawPredict"),
                        true,
                    )
                } else {
                    (
                        Schema::Gemini,
                        format!("{prefix}:generateContent"),
                        format!("{prefix}:streamGenerateContent?alt=sse"),
                        false,
                    )
                }
            }
            ProviderKind::Bedrock => (
                Schema::Converse,
                format!("{base_path}{}", converse_path(&upstream_model, false)),
                format!("{base_path}{}", converse_path(&upstream_model, true)),
                false,
            ),
        };
        let mut attributes = compile_attributes(
            &at,
            schema,
            raw.price.as_ref(),
            raw.capabilities.as_ref(),
            raw.quality,
        )?;
        // Without a configured price, the built-in list price (if known).
        if raw.price.is_none() {
            if let Some(p) = default_prices(p.kind.name(), &upstream_model) {
                attributes.input_price = Some(p.input);
                attributes.output_price = Some(p.output);
                attributes.cached_input_price = p.cached_input;
            }
        }
        let (responses_path, responses_model_json) = match responses {
            Some((path, model)) => (Some(path), model),
            None => (None, quote(&upstream_model)),
        };
        models.push(ModelRoute {
            name: raw.name,
            aliases: raw.aliases,
            provider,
            upstream_model_json: quote(&upstream_model),
            upstream_model,
            schema,
            chat_path,
            chat_stream_path,
            embeddings_path,
            responses_path,
            responses_model_json,
            passed_paths,
            vertex_anthropic,
            attributes,
        });
    }
    Ok((models, by_name))
}

fn model_object(id: &str, owner: &str) -> Value {
    serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": owner})
}

/// `GET /v1/models/{id}` in OpenAI's shape.
pub fn model_body(id: &str, owner: &str) -> Vec<u8> {
    model_object(id, owner).to_string().into_bytes()
}

/// `GET /v1/models` in OpenAI's shape, for (id, owner) pairs.
pub fn models_list_body<'a>(entries: impl Iterator<Item = (&'a str, &'a str)>) -> Vec<u8> {
    let data: Vec<Value> = entries.map(|(id, owner)| model_object(id, owner)).collect();
    serde_json::json!({"object": "list", "data": data})
        .to_string()
        .into_bytes()
}

pub(crate) fn model_listing(
    models: &[ModelRoute],
    providers: &[Provider],
    routes: &[RoutePolicy],
) -> (Vec<u8>, HashMap<String, Vec<u8>>) {
    let mut data = Vec::new();
    let mut bodies = HashMap::new();
    for route in models {
        let owner = &providers[route.provider].name;
        for name in route.public_names() {
            let obj = model_object(name, owner);
            bodies.insert(name.to_string(), obj.to_string().into_bytes());
            data.push(obj);
        }
    }
    // Routes are served by the gateway itself, across providers.
    for route in routes {
        let obj = model_object(&route.name, "meshllm");
        bodies.insert(route.name.clone(), obj.to_string().into_bytes());
        data.push(obj);
    }
    let list = serde_json::json!({"object": "list", "data": data});
    (list.to_string().into_bytes(), bodies)
}
