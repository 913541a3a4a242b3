//! One request's translation plan: which schema the caller speaks, which the
//! provider speaks, and the translators between them, through the OpenAI
//! pivot (see `translate`). Pure logic; the filter supplies bytes and
//! applies the results.

use serde_json::{Map, Value};

use crate::config::models::ModelRoute;
use crate::config::providers::Provider;
use crate::core::api_error::{normalise_error, quotes_secret, redact, ApiError, ErrorOrigin};
use crate::core::json::{splice, splice_all, TopLevel};
use crate::core::schema::Schema;
use crate::providers::ProviderKind;
use crate::translate::inbound::{self, CallerTranslator};
use crate::translate::openai_usage::{self, OpenAiStreamUsage};
use crate::translate::outbound::{self, ProviderTranslator, Upstream};
use crate::translate::passthrough::{
    AnthropicStreamWatch, GeminiStreamWatch, ResponsesStreamWatch,
};
use crate::translate::pivot::ChatRequest;
use crate::translate::scrub::Scrubbed;
use crate::translate::{request_object, Chain, StreamTranslator};

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
    let provider_schema = route.schema_for(inbound.caller);
    let mut exchange = Exchange {
        caller: inbound.caller,
        provider: provider_schema,
        stream: inbound.stream,
        caller_wants_usage: false,
        upstream_model: route.upstream_model.clone(),
    };
    let body = inbound.body;
    if inbound.caller == provider_schema {
        // Every edit is made on the caller's bytes in one pass.
        let mut edits = Vec::new();
        let upstream_json = match provider_schema {
            Schema::Responses => &route.responses_model_json,
            _ => &route.upstream_model_json,
        };
        if let Some(span) = &inbound.model_span {
            if upstream_json.as_bytes() != body.get(span.clone()).unwrap_or_default() {
                edits.push((span.clone(), upstream_json.as_bytes().to_vec()));
            }
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

    if inbound.caller == Schema::Converse {
        return Err(ApiError::invalid_request(
            Some("unsupported_api"),
            "Bedrock-shaped callers are not served.".into(),
        ));
    }
    // Caller schema -> OpenAI pivot.
    let pivot: Option<Vec<u8>> = caller_translator(inbound.caller)
        .map(|t| t.request_to_pivot(body, &route.upstream_model, inbound.stream))
        .transpose()?;
    // OpenAI pivot -> provider schema.
    let Some(translator) = provider_translator(route.schema) else {
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
        return Ok((Some(out), exchange));
    };
    let req = request_object(pivot.as_deref().unwrap_or(body))?;
    let chat = ChatRequest::parse(&req)?;
    let upstream = Upstream {
        model: &route.upstream_model,
        default_max_tokens: provider.default_max_tokens,
    };
    let mut out = translator.request_from_pivot(&chat, &upstream)?;
    if route.vertex_anthropic {
        out = for_vertex_anthropic(&out)?;
    }
    exchange.stream = chat.stream;
    // Non-OpenAI callers always get usage from the pivot; it is theirs to show.
    exchange.caller_wants_usage =
        inbound.caller == Schema::OpenAi && chat.stream && chat.include_usage;
    Ok((Some(out), exchange))
}

/// The translator between the caller's API and the pivot; None for the
/// pivot's own callers.
fn caller_translator(caller: Schema) -> Option<&'static dyn CallerTranslator> {
    match caller {
        Schema::Anthropic => Some(&inbound::Anthropic),
        Schema::Gemini => Some(&inbound::Gemini),
        Schema::Responses => Some(&inbound::Responses),
        Schema::OpenAi | Schema::Converse => None,
    }
}

/// The translator between the pivot and the provider's API; None for
/// providers that speak the pivot.
fn provider_translator(provider: Schema) -> Option<&'static dyn ProviderTranslator> {
    match provider {
        Schema::Anthropic => Some(&outbound::Anthropic),
        Schema::Gemini => Some(&outbound::Gemini),
        Schema::Converse => Some(&outbound::Bedrock),
        // OpenAI speaks the pivot, and Responses to Responses callers.
        Schema::OpenAi | Schema::Responses => None,
    }
}

/// OpenAI's reasoning models refuse `max_tokens`; OpenAI and Azure accept
/// `max_completion_tokens` for every model, so translated requests use it
/// there (OpenAI-compatible servers keep the older, more widely known name).
fn modern_token_limit(body: Vec<u8>) -> Vec<u8> {
    let renamed = match crate::core::json::TopLevel::parse(&body) {
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
    match caller_translator(caller) {
        Some(t) => t.error_body(error),
        None => error.body(),
    }
}

/// An OpenAI-shaped error body, re-shaped for the caller.
fn openai_error_to_caller(caller: Schema, status: u16, openai: Vec<u8>) -> Vec<u8> {
    match caller_translator(caller) {
        Some(t) => t.error_from_pivot(status, &openai),
        None => openai,
    }
}

/// The status a caller sees for a provider's error status.
pub fn caller_status(exchange: &Exchange, status: u16, error_type: Option<&str>) -> u16 {
    if exchange.caller == exchange.provider {
        return status;
    }
    match provider_translator(exchange.provider) {
        Some(t) => t.caller_status(status, error_type),
        None => status,
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
    if exchange.caller == exchange.provider
        && exchange.provider != Schema::OpenAi
        && in_callers_shape(exchange.caller, reply.body)
    {
        // Already in the caller's shape; only scrub secrets.
        let leaks = reply.secrets.iter().any(|s| quotes_secret(reply.body, s));
        return leaks
            .then(|| redact(&String::from_utf8_lossy(reply.body), reply.secrets).into_bytes());
    }
    // Anything else (plain text, an HTML page, another API's JSON) is read
    // through the OpenAI pivot, even between ends of the same API.
    let openai = match provider_translator(exchange.provider) {
        Some(t) => t.error_to_pivot(status, reply.error_type, reply.body),
        None => {
            let normalised =
                normalise_error(status, reply.body, reply.provider, origin, reply.secrets);
            if caller == Schema::OpenAi {
                return normalised;
            }
            normalised.unwrap_or_else(|| reply.body.to_vec())
        }
    };
    let openai = redact(&String::from_utf8_lossy(&openai), reply.secrets).into_bytes();
    Some(openai_error_to_caller(caller, status, openai))
}

/// Whether an error body already has the shape `caller`'s SDK reads:
/// Anthropic's `{"type":"error","error":{"type","message"}}`, Gemini's
/// `{"error":{"code","message","status"}}` (OpenAI's is checked by
/// `normalise_error`).
fn in_callers_shape(caller: Schema, body: &[u8]) -> bool {
    let Ok(Value::Object(doc)) = serde_json::from_slice::<Value>(body) else {
        return false;
    };
    let Some(Value::Object(error)) = doc.get("error") else {
        return false;
    };
    let text = |name: &str| error.get(name).is_some_and(Value::is_string);
    match caller {
        Schema::Anthropic => {
            doc.get("type").and_then(Value::as_str) == Some("error")
                && text("type")
                && text("message")
        }
        Schema::Gemini => {
            error.get("code").is_some_and(Value::is_u64) && text("message") && text("status")
        }
        Schema::OpenAi | Schema::Converse | Schema::Responses => false,
    }
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
    let pivot = provider_translator(exchange.provider)
        .map(|t| t.answer_to_pivot(body, model, created))
        .transpose()?;
    match caller_translator(exchange.caller) {
        Some(t) => t
            .answer_from_pivot(pivot.as_deref().unwrap_or(body))
            .map(Some),
        None => Ok(pivot),
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
    if exchange.caller == exchange.provider {
        // The same API on both ends: watched, not translated.
        return match exchange.provider {
            Schema::Anthropic => Some(Box::new(AnthropicStreamWatch::new())),
            Schema::Gemini => Some(Box::new(GeminiStreamWatch::new())),
            Schema::OpenAi => Some(Box::new(OpenAiStreamUsage::hiding(
                !exchange.caller_wants_usage,
            ))),
            Schema::Responses => Some(Box::new(ResponsesStreamWatch::new())),
            Schema::Converse => None,
        };
    }
    // A non-OpenAI caller's translator needs usage from the pivot.
    let pivot_usage = exchange.caller != Schema::OpenAi || exchange.caller_wants_usage;
    let provider_side = provider_translator(exchange.provider)
        .map(|t| t.stream_to_pivot(pivot_usage, &exchange.upstream_model, created));
    // Behind a provider-side translator the caller side reads the pivot the
    // gateway wrote, not the provider's own events.
    let reads_pivot = provider_side.is_some();
    let caller_side = caller_translator(exchange.caller).map(|t| t.stream_from_pivot(reads_pivot));
    match (provider_side, caller_side) {
        (Some(p), Some(c)) => Some(Box::new(Chain::new(p, c))),
        (p, c) => p.or(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "sk-hostile-secret-42";
    const CALLERS: [Schema; 3] = [Schema::OpenAi, Schema::Anthropic, Schema::Gemini];
    const PROVIDERS: [Schema; 4] = [
        Schema::OpenAi,
        Schema::Anthropic,
        Schema::Gemini,
        Schema::Converse,
    ];

    /// tests/fixtures/hostile/errors: (name, status, body), the credential
    /// placeholder filled with `SECRET`.
    fn corpus() -> Vec<(String, u16, Vec<u8>)> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/hostile/errors");
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name == "README.md" {
                continue;
            }
            let status: u16 = name.split('-').next().unwrap().parse().unwrap();
            let body = std::fs::read(&path).unwrap();
            let text = String::from_utf8_lossy(&body).replace("{{credential}}", SECRET);
            let body = if body.windows(2).any(|w| w == b"{{") {
                text.into_bytes()
            } else {
                body
            };
            out.push((name, status, body));
        }
        assert!(out.len() >= 20, "the corpus is missing");
        out
    }

    fn exchange(caller: Schema, provider: Schema) -> Exchange {
        Exchange {
            caller,
            provider,
            stream: false,
            caller_wants_usage: false,
            upstream_model: "m".into(),
        }
    }

    /// The body parses as `caller`'s error shape; a body the gateway wrote
    /// carries every field and the status it is sent with.
    fn assert_shape(caller: Schema, status: u16, body: &[u8], rewritten: bool, what: &str) {
        let v: Value = serde_json::from_slice(body).unwrap_or_else(|e| {
            panic!("{what}: not JSON ({e}): {}", String::from_utf8_lossy(body))
        });
        let message = |e: &Value| {
            e["message"]
                .as_str()
                .filter(|m| !m.is_empty())
                .map(str::to_string)
        };
        match caller {
            Schema::Anthropic => {
                assert_eq!(v["type"], "error", "{what}: {v}");
                assert!(v["error"]["type"].is_string(), "{what}: {v}");
                assert!(message(&v["error"]).is_some(), "{what}: {v}");
            }
            Schema::Gemini => {
                let e = &v["error"];
                assert!(e["code"].is_u64() && e["status"].is_string(), "{what}: {v}");
                assert!(message(e).is_some(), "{what}: {v}");
                if rewritten {
                    assert_eq!(e["code"], status, "{what}: {v}");
                }
            }
            Schema::OpenAi | Schema::Converse | Schema::Responses => {
                let e = &v["error"];
                assert!(message(e).is_some(), "{what}: {v}");
                if rewritten {
                    assert!(e["type"].is_string(), "{what}: {v}");
                    assert!(
                        e.get("param").is_some() && e.get("code").is_some(),
                        "{what}: {v}"
                    );
                }
            }
        }
    }

    #[test]
    fn every_hostile_error_reaches_every_caller_in_its_shape() {
        for (name, status, body) in corpus() {
            for caller in CALLERS {
                for provider in PROVIDERS {
                    for via_upstream in [true, false] {
                        let x = exchange(caller, provider);
                        let reply = ErrorReply {
                            status,
                            body: &body,
                            error_type: None,
                            via_upstream,
                            provider: Some("p"),
                            secrets: &[SECRET],
                        };
                        let out = translate_error(caller, Some(&x), &reply);
                        let rewritten = out.is_some();
                        let sent = out.unwrap_or_else(|| body.clone());
                        let what = format!("{name}: {caller:?} caller, {provider:?} provider, via upstream: {via_upstream}");
                        let status = if via_upstream {
                            caller_status(&x, status, None)
                        } else {
                            status
                        };
                        assert_shape(caller, status, &sent, rewritten, &what);
                        assert!(!quotes_secret(&sent, SECRET), "{what}: the key leaked");
                    }
                }
            }
        }
    }

    #[test]
    fn an_error_already_in_the_callers_shape_passes_as_it_is() {
        let passing: &[(Schema, &str)] = &[
            (Schema::Anthropic, "404-anthropic-shaped.json"),
            (Schema::Gemini, "429-gemini-shaped.json"),
            (Schema::OpenAi, "503-openai-shaped.json"),
        ];
        let corpus = corpus();
        for (api, file) in passing {
            let (_, status, body) = corpus.iter().find(|(n, _, _)| n == file).unwrap();
            let reply = ErrorReply {
                status: *status,
                body,
                error_type: None,
                via_upstream: true,
                provider: Some("p"),
                secrets: &[SECRET],
            };
            assert_eq!(
                translate_error(*api, Some(&exchange(*api, *api)), &reply),
                None,
                "{file}"
            );
        }
        // With the key in it: only the key changes.
        for (api, file) in [
            (Schema::Anthropic, "401-anthropic-shaped-leak.json"),
            (Schema::Gemini, "401-gemini-shaped-leak.json"),
        ] {
            let (_, status, body) = corpus.iter().find(|(n, _, _)| n == file).unwrap();
            let reply = ErrorReply {
                status: *status,
                body,
                error_type: None,
                via_upstream: true,
                provider: Some("p"),
                secrets: &[SECRET],
            };
            let out = translate_error(api, Some(&exchange(api, api)), &reply).unwrap();
            let expected = String::from_utf8_lossy(body).replace(SECRET, "[redacted]");
            assert_eq!(String::from_utf8(out).unwrap(), expected, "{file}");
        }
    }

    #[test]
    fn other_bodies_from_a_same_api_provider_are_reshaped() {
        let cases: &[(Schema, u16, &[u8], &str, &str)] = &[
            (Schema::Anthropic, 503, b"upstream overloaded", "overloaded_error", "upstream overloaded"),
            (
                Schema::Anthropic,
                502,
                b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>",
                "api_error",
                "502 Bad Gateway",
            ),
            (Schema::Gemini, 400, br#"{"detail": "temperature must be <= 2"}"#, "INVALID_ARGUMENT", "temperature must be <= 2"),
            (
                Schema::Gemini,
                503,
                br#"[{"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}}]"#,
                "UNAVAILABLE",
                "The model is overloaded.",
            ),
        ];
        for (api, status, body, kind, text) in cases {
            let reply = ErrorReply {
                status: *status,
                body,
                error_type: None,
                via_upstream: true,
                provider: Some("p"),
                secrets: &[],
            };
            let out = translate_error(*api, Some(&exchange(*api, *api)), &reply).unwrap();
            let v: Value = serde_json::from_slice(&out).unwrap();
            let (got_kind, message) = match api {
                Schema::Anthropic => (&v["error"]["type"], &v["error"]["message"]),
                _ => (&v["error"]["status"], &v["error"]["message"]),
            };
            assert_eq!(got_kind, kind, "{v}");
            assert!(message.as_str().unwrap().contains(text), "{v}");
        }
    }
}
