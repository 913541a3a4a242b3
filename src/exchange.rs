//! One request's translation plan: which schema the caller speaks, which the
//! provider speaks, and the translators between them, through the OpenAI
//! pivot (see `translate`). Pure logic; the filter supplies bytes and
//! applies the results.

use serde_json::{Map, Value};

use crate::api::openai::{contains, normalise_error, redact, ApiError, ErrorOrigin};
use crate::config::{ModelRoute, Provider, ProviderKind};
use crate::json::{splice, splice_all, TopLevel};
use crate::translate::openai_usage::{self, OpenAiStreamUsage};
use crate::translate::passthrough::{AnthropicStreamWatch, GeminiStreamWatch};
use crate::translate::scrub::Scrubbed;
use crate::translate::{
    anthropic_openai, gemini_openai, openai_anthropic, openai_bedrock, openai_gemini, Chain,
    Schema, StreamTranslator,
};

/// The `anthropic_version` Vertex AI expects in the body of Anthropic models.
pub const VERTEX_ANTHROPIC_VERSION: &str = "vertex-2023-10-16";

/// The caller's request as the filter parsed it.
pub struct Inbound<'a> {
    pub caller: Schema,
    pub body: &'a [u8],
    /// `body` as the filter parsed it.
    pub doc: &'a TopLevel<'a>,
    /// Where `model` sits in the body (OpenAI and Anthropic callers).
    pub model_span: Option<std::ops::Range<usize>>,
    /// The caller's model name.
    pub model: &'a str,
    /// Gemini callers say it in the URL; the others in the body.
    pub stream: bool,
}

/// What the response side needs to know.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub caller: Schema,
    pub provider: Schema,
    pub stream: bool,
    /// OpenAI callers: they asked for a usage chunk.
    pub caller_wants_usage: bool,
    /// The upstream model, for `model` fields providers leave out.
    pub upstream_model: String,
}

/// The body to send upstream (None: unchanged) and the plan.
pub fn translate_request(
    inbound: &Inbound<'_>,
    route: &ModelRoute,
    provider: &Provider,
) -> Result<(Option<Vec<u8>>, Exchange), ApiError> {
    let mut exchange = Exchange {
        caller: inbound.caller,
        provider: route.schema,
        stream: inbound.stream,
        caller_wants_usage: false,
        upstream_model: route.upstream_model.clone(),
    };
    let body = inbound.body;
    if inbound.caller == route.schema {
        // Every edit is made on the caller's bytes in one pass.
        let mut edits = Vec::new();
        if let (Some(span), false) = (&inbound.model_span, inbound.model == route.upstream_model) {
            edits.push((span.clone(), route.upstream_model_json.as_bytes().to_vec()));
        }
        if route.schema == Schema::OpenAi && inbound.stream {
            let (edit, asked) = openai_usage::request_usage(body, inbound.doc)?;
            exchange.caller_wants_usage = asked;
            edits.extend(edit);
        }
        let mut out = (!edits.is_empty()).then(|| splice_all(body, edits));
        if route.vertex_anthropic {
            out = Some(for_vertex_anthropic(out.as_deref().unwrap_or(body))?);
        }
        return Ok((out, exchange));
    }

    // Caller schema -> OpenAI pivot.
    let pivot: Option<Vec<u8>> = match inbound.caller {
        Schema::OpenAi => None,
        Schema::Anthropic => {
            Some(anthropic_openai::messages_request_to_chat(body, &route.upstream_model)?.0)
        }
        Schema::Gemini => Some(gemini_openai::gemini_request_to_chat(
            body,
            &route.upstream_model,
            inbound.stream,
        )?),
        Schema::Converse => {
            return Err(ApiError::invalid_request(
                Some("unsupported_api"),
                "Bedrock-shaped callers are not served.".into(),
            ))
        }
    };
    let pivot_body = pivot.as_deref().unwrap_or(body);
    // OpenAI pivot -> provider schema.
    let (out, stream, usage) = match route.schema {
        Schema::OpenAi => {
            // The pivot translators ask for usage in streamed requests already.
            let out = pivot.unwrap_or_else(|| body.to_vec());
            let out = if matches!(
                provider.kind,
                ProviderKind::OpenAi | ProviderKind::AzureOpenAi
            ) {
                modern_token_limit(out)
            } else {
                out
            };
            (out, inbound.stream, false)
        }
        Schema::Anthropic => {
            let (b, info) = openai_anthropic::chat_request_to_messages(
                pivot_body,
                &route.upstream_model,
                provider.default_max_tokens,
            )?;
            let b = if route.vertex_anthropic {
                for_vertex_anthropic(&b)?
            } else {
                b
            };
            (b, info.stream, info.include_usage)
        }
        Schema::Gemini => {
            let (b, info) = openai_gemini::chat_request_to_gemini(pivot_body)?;
            (b, info.stream, info.include_usage)
        }
        Schema::Converse => {
            let (b, info) = openai_bedrock::chat_request_to_converse(
                pivot_body,
                Some(provider.default_max_tokens),
            )?;
            (b, info.stream, info.include_usage)
        }
    };
    exchange.stream = stream;
    // Non-OpenAI callers always get usage from the pivot; it is theirs to show.
    exchange.caller_wants_usage = inbound.caller == Schema::OpenAi && usage;
    Ok((Some(out), exchange))
}

/// OpenAI's reasoning models refuse `max_tokens`; OpenAI and Azure accept
/// `max_completion_tokens` for every model, so translated requests use it
/// there (OpenAI-compatible servers keep the older, more widely known name).
fn modern_token_limit(body: Vec<u8>) -> Vec<u8> {
    let renamed = match crate::json::TopLevel::parse(&body) {
        Ok(doc) => match (doc.get("max_tokens"), doc.get("max_completion_tokens")) {
            (Ok(Some(f)), Ok(None)) => Some(splice(&body, f.key.clone(), b"max_completion_tokens")),
            _ => None,
        },
        Err(_) => None,
    };
    renamed.unwrap_or(body)
}

/// Vertex AI takes Anthropic models' name from the URL and wants its own
/// `anthropic_version` in the body.
fn for_vertex_anthropic(body: &[u8]) -> Result<Vec<u8>, ApiError> {
    let mut map: Map<String, Value> = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid_request(
            Some("invalid_json"),
            format!("The request body is not a valid JSON object: {e}."),
        )
    })?;
    map.remove("model");
    map.insert(
        "anthropic_version".into(),
        Value::String(VERTEX_ANTHROPIC_VERSION.into()),
    );
    serde_json::to_vec(&map).map_err(|e| {
        ApiError::new(
            500,
            "server_error",
            Some("gateway_error"),
            format!("Gateway error: could not serialize the request: {e}."),
        )
    })
}

/// An error the gateway raises itself, in the caller's shape.
pub fn error_body(caller: Schema, error: &ApiError) -> Vec<u8> {
    match caller {
        Schema::Anthropic => anthropic_openai::error_body(error),
        Schema::Gemini => gemini_openai::error_body(error),
        Schema::OpenAi | Schema::Converse => error.body(),
    }
}

/// An OpenAI-shaped error body, re-shaped for the caller.
fn openai_error_to_caller(caller: Schema, status: u16, openai: Vec<u8>) -> Vec<u8> {
    match caller {
        Schema::Anthropic => anthropic_openai::chat_error_to_messages(status, &openai),
        Schema::Gemini => gemini_openai::chat_error_to_gemini(status, &openai),
        Schema::OpenAi | Schema::Converse => openai,
    }
}

/// The status a caller sees for a provider's error status.
pub fn caller_status(exchange: &Exchange, status: u16, error_type: Option<&str>) -> u16 {
    if exchange.caller == exchange.provider {
        return status;
    }
    match exchange.provider {
        Schema::OpenAi => status,
        Schema::Anthropic => openai_anthropic::caller_status(status),
        Schema::Gemini => openai_gemini::caller_status(status),
        Schema::Converse => openai_bedrock::caller_status(status, error_type),
    }
}

/// What an error reply becomes for the caller (None: pass it unchanged).
/// `status` is the provider's status; `via_upstream` false means Envoy
/// answered (no provider reached).
pub struct ErrorReply<'a> {
    pub status: u16,
    pub body: &'a [u8],
    pub error_type: Option<&'a str>,
    pub via_upstream: bool,
    pub provider: Option<&'a str>,
    pub secrets: &'a [&'a str],
}

pub fn translate_error(
    caller: Schema,
    exchange: Option<&Exchange>,
    reply: &ErrorReply<'_>,
) -> Option<Vec<u8>> {
    let status = match exchange {
        Some(x) if reply.via_upstream => caller_status(x, reply.status, reply.error_type),
        _ => reply.status,
    };
    let origin = if reply.via_upstream {
        ErrorOrigin::Provider
    } else {
        ErrorOrigin::Proxy
    };
    let Some(exchange) = exchange.filter(|_| reply.via_upstream) else {
        // Envoy's own reply (or no provider chosen): OpenAI shape, then the caller's.
        let openai = normalise_error(status, reply.body, reply.provider, origin, reply.secrets)
            .unwrap_or_else(|| reply.body.to_vec());
        return match caller {
            Schema::OpenAi => Some(openai),
            _ => Some(openai_error_to_caller(caller, status, openai)),
        };
    };
    if exchange.caller == exchange.provider && exchange.provider != Schema::OpenAi {
        // Already in the caller's shape; only scrub secrets.
        let leaks = reply
            .secrets
            .iter()
            .any(|s| contains(reply.body, s.as_bytes()));
        return leaks
            .then(|| redact(&String::from_utf8_lossy(reply.body), reply.secrets).into_bytes());
    }
    let openai = match exchange.provider {
        Schema::OpenAi => {
            let normalised =
                normalise_error(status, reply.body, reply.provider, origin, reply.secrets);
            if caller == Schema::OpenAi {
                return normalised;
            }
            normalised.unwrap_or_else(|| reply.body.to_vec())
        }
        Schema::Anthropic => openai_anthropic::messages_error_to_chat(status, reply.body),
        Schema::Gemini => openai_gemini::gemini_error_to_chat(status, reply.body),
        Schema::Converse => {
            openai_bedrock::converse_error_to_chat(status, reply.error_type, reply.body)
        }
    };
    let openai = redact(&String::from_utf8_lossy(&openai), reply.secrets).into_bytes();
    Some(openai_error_to_caller(caller, status, openai))
}

/// A complete (non-streamed) answer, translated for the caller. None: pass
/// it unchanged.
pub fn translate_response(
    exchange: &Exchange,
    body: &[u8],
    created: u64,
) -> Result<Option<Vec<u8>>, String> {
    if exchange.caller == exchange.provider {
        return Ok(None);
    }
    let model = exchange.upstream_model.as_str();
    let pivot = match exchange.provider {
        Schema::OpenAi => None,
        Schema::Anthropic => Some(openai_anthropic::messages_response_to_chat(body, created)?),
        Schema::Gemini => Some(openai_gemini::gemini_response_to_chat(
            body, model, created,
        )?),
        Schema::Converse => Some(openai_bedrock::converse_response_to_chat(
            body, model, created,
        )?),
    };
    let pivot_body = pivot.as_deref().unwrap_or(body);
    match exchange.caller {
        Schema::OpenAi | Schema::Converse => Ok(pivot),
        Schema::Anthropic => anthropic_openai::chat_response_to_messages(pivot_body).map(Some),
        Schema::Gemini => gemini_openai::chat_response_to_gemini(pivot_body).map(Some),
    }
}

/// Whether a complete answer needs translating (so its headers are held).
pub fn translates_response(exchange: &Exchange) -> bool {
    exchange.caller != exchange.provider
}

/// The stream translator (or watcher) for a streamed answer. `secrets`
/// (the provider's keys) never reach the caller, whatever the provider's
/// events quote.
pub fn stream_translator(
    exchange: &Exchange,
    created: u64,
    secrets: &[&str],
) -> Option<Box<dyn StreamTranslator>> {
    let translator = events_translator(exchange, created)?;
    if secrets.iter().all(|s| s.is_empty()) {
        return Some(translator);
    }
    Some(Box::new(Scrubbed::new(translator, secrets)))
}

fn events_translator(exchange: &Exchange, created: u64) -> Option<Box<dyn StreamTranslator>> {
    let model = exchange.upstream_model.as_str();
    // A non-OpenAI caller's translator needs usage from the pivot.
    let pivot_usage = exchange.caller != Schema::OpenAi || exchange.caller_wants_usage;
    let provider_side: Option<Box<dyn StreamTranslator>> = match exchange.provider {
        Schema::Anthropic if exchange.caller == Schema::Anthropic => {
            return Some(Box::new(AnthropicStreamWatch::new()))
        }
        Schema::Gemini if exchange.caller == Schema::Gemini => {
            return Some(Box::new(GeminiStreamWatch::new()))
        }
        Schema::OpenAi if exchange.caller == Schema::OpenAi => Some(Box::new(
            OpenAiStreamUsage::hiding(!exchange.caller_wants_usage),
        )),
        Schema::OpenAi => None,
        Schema::Anthropic => Some(Box::new(openai_anthropic::MessagesStreamToChat::new(
            pivot_usage,
            created,
        ))),
        Schema::Gemini => Some(Box::new(openai_gemini::GeminiStreamToChat::new(
            pivot_usage,
            model,
            created,
        ))),
        Schema::Converse => Some(Box::new(openai_bedrock::ConverseStreamToChat::new(
            pivot_usage,
            model,
            created,
        ))),
    };
    // Behind a provider-side translator the caller side reads the pivot the
    // gateway wrote, not the provider's own events.
    let reads_pivot = provider_side.is_some();
    let caller_side: Option<Box<dyn StreamTranslator>> = match exchange.caller {
        Schema::OpenAi | Schema::Converse => None,
        Schema::Anthropic => {
            let t = anthropic_openai::ChatStreamToMessages::new();
            Some(Box::new(if reads_pivot { t.reading_pivot() } else { t }))
        }
        Schema::Gemini => {
            let t = gemini_openai::ChatStreamToGemini::new();
            Some(Box::new(if reads_pivot { t.reading_pivot() } else { t }))
        }
    };
    match (provider_side, caller_side) {
        (Some(p), Some(c)) => Some(Box::new(Chain::new(p, c))),
        (p, c) => p.or(c),
    }
}
