//! The per-request logic of the gateway, written against `Host`.
//!
//! Request side: recognise the OpenAI endpoint, answer `/v1/models` locally,
//! buffer the JSON body of chat/embeddings calls, pick the model's route,
//! rewrite `model` in place and point the request at the provider.
//! Response side: pass successful answers through untouched (streams chunk by
//! chunk) and turn error replies into OpenAI's error shape.

use std::rc::Rc;

use crate::api::openai::{normalise_error, redact, ApiError, ErrorOrigin};
use crate::config::{Config, ModelRoute, Operation, Provider, ProviderKind};
use crate::host::{Host, HostResult};
use crate::json::{splice, Kind, TopLevel};
use crate::metrics;
use crate::translate::openai_anthropic::{self, MessagesStreamToChat};
use crate::translate::StreamTranslator;

/// The header the Envoy route reads to pick the provider's cluster.
pub const CLUSTER_HEADER: &str = "x-meshllm-cluster";
pub const PROVIDER_RESPONSE_HEADER: &str = "x-meshllm-provider";
pub const MODEL_RESPONSE_HEADER: &str = "x-meshllm-model";

/// Client headers that carry credentials or account selection; a provider
/// must never see them (the gateway's own key is used instead).
const CLIENT_CREDENTIAL_HEADERS: &[&str] = &[
    "authorization",
    "x-api-key",
    "api-key",
    "x-goog-api-key",
    "openai-organization",
    "openai-project",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Pause,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing decided yet.
    Start,
    /// Buffering the request body of an LLM call.
    ReadingBody,
    /// Sent to a provider.
    Forwarded,
    /// Answered by the filter itself.
    Answered,
}

pub struct RequestFilter {
    config: Rc<Config>,
    phase: Phase,
    operation: Option<Operation>,
    route: Option<usize>,
    status: u16,
    /// The request was translated to Anthropic's Messages API.
    anthropic: Option<openai_anthropic::ChatRequestInfo>,
    response: ResponseMode,
}

/// What the response side does with the provider's answer.
enum ResponseMode {
    /// Forward untouched (streams chunk by chunk).
    PassThrough,
    /// Buffer an error reply and rewrite it into OpenAI's shape.
    NormaliseError(ErrorOrigin),
    /// Buffer an Anthropic error reply and translate it.
    AnthropicError,
    /// Buffer an Anthropic message and translate it (headers held meanwhile).
    AnthropicMessage,
    /// Translate Anthropic's event stream event by event.
    AnthropicStream(Box<MessagesStreamToChat>),
}

enum Endpoint {
    Models,
    Model(String),
    Call(Operation),
}

fn match_endpoint(path: &str) -> Option<(Endpoint, &'static str)> {
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    let path = path.strip_suffix('/').unwrap_or(path);
    match path {
        "/v1/chat/completions" => Some((Endpoint::Call(Operation::ChatCompletions), "POST")),
        "/v1/embeddings" => Some((Endpoint::Call(Operation::Embeddings), "POST")),
        "/v1/models" => Some((Endpoint::Models, "GET")),
        _ => {
            let id = percent_decode(path.strip_prefix("/v1/models/")?)?;
            (!id.is_empty()).then_some((Endpoint::Model(id), "GET"))
        }
    }
}

/// Decodes `%XX` escapes (SDKs encode the `/` of ids like `org/model`).
/// None when an escape is malformed or the result is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    if !s.contains('%') {
        return Some(s.to_string());
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl RequestFilter {
    pub fn new(config: Rc<Config>) -> Self {
        RequestFilter {
            config,
            phase: Phase::Start,
            operation: None,
            route: None,
            status: 0,
            anthropic: None,
            response: ResponseMode::PassThrough,
        }
    }

    fn route(&self) -> Option<&ModelRoute> {
        self.route.map(|i| &self.config.models[i])
    }

    fn provider(&self) -> Option<&Provider> {
        self.route().map(|r| &self.config.providers[r.provider])
    }

    fn reply(
        &mut self,
        host: &mut dyn Host,
        status: u16,
        extra: &[(&str, &str)],
        body: &[u8],
    ) -> Flow {
        let mut headers: Vec<(&str, &str)> = Vec::with_capacity(extra.len() + 1);
        headers.push(("content-type", "application/json"));
        headers.extend_from_slice(extra);
        if let Err(e) = host.send_response(status, &headers, body) {
            log::error!("could not send a local reply: {e}");
        }
        self.phase = Phase::Answered;
        self.status = status;
        Flow::Pause
    }

    fn reject(&mut self, host: &mut dyn Host, error: ApiError) -> Flow {
        let body = error.body();
        self.reply(host, error.status, &[], &body)
    }

    pub fn on_request_headers(&mut self, host: &mut dyn Host, end_of_stream: bool) -> Flow {
        // Routing is the filter's decision alone; a client cannot pick a cluster.
        if host.request_header(CLUSTER_HEADER).is_some() {
            let _ = host.remove_request_header(CLUSTER_HEADER);
        }
        let method = host.request_header(":method").unwrap_or_default();
        let path = host.request_header(":path").unwrap_or_default();
        let Some((endpoint, allowed)) = match_endpoint(&path) else {
            let shown = path.split_once('?').map_or(path.as_str(), |(p, _)| p);
            return self.reject(
                host,
                ApiError::new(
                    404,
                    "invalid_request_error",
                    Some("unknown_url"),
                    format!(
                        "Unknown request URL: {method} {shown}. This gateway serves \
                         POST /v1/chat/completions, POST /v1/embeddings and GET /v1/models."
                    ),
                ),
            );
        };
        if method != allowed {
            let error = ApiError::new(
                405,
                "invalid_request_error",
                Some("method_not_allowed"),
                format!("Method {method} is not allowed on this URL; use {allowed}."),
            );
            let body = error.body();
            return self.reply(host, 405, &[("allow", allowed)], &body);
        }
        match endpoint {
            Endpoint::Models => {
                let config = Rc::clone(&self.config);
                self.reply(host, 200, &[], &config.models_list_body)
            }
            Endpoint::Model(id) => {
                let config = Rc::clone(&self.config);
                match config.model_body(&id) {
                    Some(body) => self.reply(host, 200, &[], body),
                    None => self.reject(host, model_not_found(&id)),
                }
            }
            Endpoint::Call(op) => {
                self.operation = Some(op);
                if end_of_stream {
                    return self.reject(
                        host,
                        ApiError::invalid_request(
                            Some("missing_body"),
                            "The request has no body; send a JSON object.".into(),
                        ),
                    );
                }
                self.phase = Phase::ReadingBody;
                Flow::Pause
            }
        }
    }

    pub fn on_request_body(
        &mut self,
        host: &mut dyn Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Flow {
        if self.phase != Phase::ReadingBody {
            return Flow::Continue;
        }
        let limit = self.config.max_request_bytes;
        if body_size > limit {
            return self.reject(
                host,
                ApiError::new(
                    413,
                    "invalid_request_error",
                    Some("request_too_large"),
                    format!(
                        "The request body is larger than this gateway's limit of {limit} bytes."
                    ),
                ),
            );
        }
        if !end_of_stream {
            return Flow::Pause;
        }
        self.finish_request(host, body_size)
    }

    /// Trailers end a request whose last body chunk was not marked final.
    pub fn on_request_trailers(&mut self, host: &mut dyn Host, body_size: usize) -> Flow {
        if self.phase != Phase::ReadingBody {
            return Flow::Continue;
        }
        self.finish_request(host, body_size)
    }

    fn finish_request(&mut self, host: &mut dyn Host, body_size: usize) -> Flow {
        let body = match host.request_body(body_size) {
            Ok(b) => b,
            Err(e) => {
                return self.reject(
                    host,
                    internal(format!("could not read the request body: {e}")),
                )
            }
        };
        match self.route_request(host, &body) {
            Ok(()) => {
                self.phase = Phase::Forwarded;
                Flow::Continue
            }
            Err(error) => self.reject(host, error),
        }
    }

    fn route_request(&mut self, host: &mut dyn Host, body: &[u8]) -> Result<(), ApiError> {
        let op = self.operation.unwrap_or(Operation::ChatCompletions);
        let doc = TopLevel::parse(body).map_err(|e| {
            ApiError::invalid_request(
                Some("invalid_json"),
                format!("The request body is not a valid JSON object: {e}."),
            )
        })?;
        let field = |name: &'static str| {
            doc.get(name).map_err(|_| {
                ApiError::invalid_request(
                    Some("duplicate_parameter"),
                    format!("The parameter '{name}' is given more than once."),
                )
                .with_param(name)
            })
        };
        let model_field = field("model")?.ok_or_else(|| {
            ApiError::invalid_request(
                Some("missing_required_parameter"),
                "You must provide a model parameter.".into(),
            )
            .with_param("model")
        })?;
        let model = doc
            .str_value(model_field)
            .ok_or_else(|| invalid_type("model", "a string", model_field.kind))?;
        let (required, want) = match op {
            Operation::ChatCompletions => ("messages", Some(Kind::Array)),
            Operation::Embeddings => ("input", None),
        };
        let required_field = field(required)?.ok_or_else(|| {
            ApiError::invalid_request(
                Some("missing_required_parameter"),
                format!("Missing required parameter: '{required}'."),
            )
            .with_param(required)
        })?;
        if let Some(kind) = want {
            if required_field.kind != kind {
                return Err(invalid_type(required, kind.name(), required_field.kind));
            }
        }
        if let Some(stream) = field("stream")? {
            if !matches!(stream.kind, Kind::Bool | Kind::Null) {
                return Err(invalid_type("stream", "a boolean", stream.kind));
            }
        }

        let config = Rc::clone(&self.config);
        let route_index = config
            .route_index(&model)
            .ok_or_else(|| model_not_found(&model))?;
        let route = &config.models[route_index];
        self.route = Some(route_index);
        let provider = &config.providers[route.provider];
        if provider.key_missing {
            return Err(ApiError::new(
                500,
                "server_error",
                Some("provider_key_missing"),
                format!(
                    "The gateway has no API key for provider {:?}: the proxy's environment \
                     variable {} is not set.",
                    provider.name,
                    provider.api_key_env.as_deref().unwrap_or_default()
                ),
            ));
        }

        let path = route.path(op, false).ok_or_else(|| {
            ApiError::invalid_request(
                Some("unsupported_operation"),
                format!(
                    "The model `{model}` is served by provider {:?}, which has no embeddings API.",
                    provider.name
                ),
            )
            .with_param("model")
        })?;
        let new_body = if provider.kind == ProviderKind::Anthropic {
            let (translated, info) = openai_anthropic::chat_request_to_messages(
                body,
                &route.upstream_model,
                provider.default_max_tokens,
            )?;
            self.anthropic = Some(info);
            Some(translated)
        } else {
            (*model != *route.upstream_model).then(|| {
                splice(
                    body,
                    model_field.value.clone(),
                    route.upstream_model_json.as_bytes(),
                )
            })
        };
        point_at_provider(
            host,
            provider,
            path,
            new_body.as_deref().map_or(body.len(), <[u8]>::len),
        )
        .map_err(|e| internal(format!("could not rewrite the request headers: {e}")))?;
        if let Some(new_body) = &new_body {
            host.replace_request_body(body.len(), new_body)
                .map_err(|e| internal(format!("could not rewrite the request body: {e}")))?;
        }
        Ok(())
    }

    pub fn on_response_headers(&mut self, host: &mut dyn Host, end_of_stream: bool) -> Flow {
        if self.phase == Phase::Answered {
            return Flow::Continue;
        }
        self.status = host
            .response_header(":status")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if self.phase == Phase::Forwarded {
            if let (Some(provider), Some(route)) = (self.provider(), self.route()) {
                let _ = host.set_response_header(PROVIDER_RESPONSE_HEADER, &provider.name);
                let _ = host.set_response_header(MODEL_RESPONSE_HEADER, &route.upstream_model);
            }
        }
        // `via_upstream` means the provider answered; any other detail means
        // Envoy did (connect failure, timeout, overflow, ...).
        let via_upstream = matches!(
            host.response_code_details().as_deref(),
            Some("via_upstream") | None
        );
        let translated = self.phase == Phase::Forwarded && self.anthropic.is_some();
        self.response = match (self.status, translated, via_upstream) {
            (400.., _, _) if end_of_stream => ResponseMode::PassThrough,
            (400.., true, true) => {
                let caller = openai_anthropic::caller_status(self.status);
                if caller != self.status {
                    let _ = host.set_response_header(":status", &caller.to_string());
                }
                ResponseMode::AnthropicError
            }
            (400.., _, true) => ResponseMode::NormaliseError(ErrorOrigin::Provider),
            (400.., _, false) => ResponseMode::NormaliseError(ErrorOrigin::Proxy),
            (200..=299, true, _) if !end_of_stream => {
                let stream = self.anthropic.as_ref().is_some_and(|a| a.stream);
                let include_usage = self.anthropic.as_ref().is_some_and(|a| a.include_usage);
                let _ = host.remove_response_header("content-length");
                let _ = host.remove_response_header("content-encoding");
                if stream {
                    let _ = host.set_response_header("content-type", "text/event-stream");
                    ResponseMode::AnthropicStream(Box::new(MessagesStreamToChat::new(
                        include_usage,
                        host.now_unix_seconds(),
                    )))
                } else {
                    let _ = host.set_response_header("content-type", "application/json");
                    // Hold the headers: a message that cannot be translated
                    // must not go out as a 200.
                    self.response = ResponseMode::AnthropicMessage;
                    return Flow::Pause;
                }
            }
            _ => ResponseMode::PassThrough,
        };
        if matches!(
            self.response,
            ResponseMode::NormaliseError(_) | ResponseMode::AnthropicError
        ) {
            // The body is replaced once complete; its length will change.
            let _ = host.remove_response_header("content-length");
            let _ = host.remove_response_header("content-encoding");
            let _ = host.set_response_header("content-type", "application/json");
        }
        Flow::Continue
    }

    pub fn on_response_body(
        &mut self,
        host: &mut dyn Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Flow {
        if let ResponseMode::AnthropicStream(translator) = &mut self.response {
            return translate_stream_chunk(host, translator, body_size, end_of_stream);
        }
        if matches!(self.response, ResponseMode::PassThrough) {
            return Flow::Continue;
        }
        if !end_of_stream {
            return Flow::Pause;
        }
        let mode = std::mem::replace(&mut self.response, ResponseMode::PassThrough);
        let body = match host.response_body(body_size) {
            Ok(b) => b,
            Err(e) => {
                log::warn!("could not read a response body: {e}");
                return Flow::Continue;
            }
        };
        let config = Rc::clone(&self.config);
        let provider_entry = self
            .route
            .map(|i| &config.providers[config.models[i].provider]);
        let provider = provider_entry.map(|p| p.name.as_str());
        let secrets: Vec<&str> = provider_entry
            .and_then(|p| p.api_key.as_deref())
            .into_iter()
            .collect();
        let new_body = match mode {
            ResponseMode::NormaliseError(origin) => {
                normalise_error(self.status, &body, provider, origin, &secrets)
            }
            ResponseMode::AnthropicError => {
                let translated = openai_anthropic::messages_error_to_chat(self.status, &body);
                Some(redact(&String::from_utf8_lossy(&translated), &secrets).into_bytes())
            }
            ResponseMode::AnthropicMessage => {
                match openai_anthropic::messages_response_to_chat(&body, host.now_unix_seconds()) {
                    Ok(translated) => Some(translated),
                    Err(e) => {
                        log::warn!("could not translate a provider answer: {e}");
                        self.status = 502;
                        let _ = host.set_response_header(":status", "502");
                        Some(
                            ApiError::new(
                                502,
                                "server_error",
                                Some("invalid_provider_response"),
                                format!(
                                    "Provider {:?} sent an answer the gateway could not \
                                     translate: {e}.",
                                    provider.unwrap_or("none")
                                ),
                            )
                            .body(),
                        )
                    }
                }
            }
            ResponseMode::PassThrough | ResponseMode::AnthropicStream(_) => None,
        };
        if let Some(new_body) = new_body {
            if let Err(e) = host.replace_response_body(body_size, &new_body) {
                log::warn!("could not rewrite a response body: {e}");
            }
        }
        Flow::Continue
    }

    /// The request is over (answered, failed or abandoned).
    pub fn on_done(&mut self, host: &mut dyn Host) {
        let (provider, model) = match (self.provider(), self.route()) {
            (Some(p), Some(r)) => (p.name.as_str(), r.name.as_str()),
            _ => ("none", "none"),
        };
        let name = metrics::requests_total(provider, model, self.status);
        host.count(&name, 1);
    }
}

/// Replaces one chunk of an Anthropic event stream with its translation:
/// every event the chunk completes goes out now, partial ones wait.
fn translate_stream_chunk(
    host: &mut dyn Host,
    translator: &mut MessagesStreamToChat,
    body_size: usize,
    end_of_stream: bool,
) -> Flow {
    let chunk = match host.response_body(body_size) {
        Ok(c) => c,
        Err(e) => {
            log::warn!("could not read a stream chunk: {e}");
            Vec::new()
        }
    };
    let mut out = Vec::with_capacity(chunk.len() + 64);
    translator.push(&chunk, &mut out);
    if end_of_stream {
        translator.finish(&mut out);
    }
    if let Err(e) = host.replace_response_body(body_size, &out) {
        log::warn!("could not rewrite a stream chunk: {e}");
    }
    Flow::Continue
}

fn point_at_provider(
    host: &mut dyn Host,
    provider: &Provider,
    path: &str,
    body_len: usize,
) -> HostResult {
    for name in CLIENT_CREDENTIAL_HEADERS {
        if host.request_header(name).is_some() {
            host.remove_request_header(name)?;
        }
    }
    // Error replies and (later) usage must be readable. No accept-encoding
    // at all would allow any encoding, so ask for identity explicitly.
    host.set_request_header("accept-encoding", "identity")?;
    host.set_request_header(":authority", &provider.authority)?;
    host.set_request_header(":path", path)?;
    host.set_request_header(CLUSTER_HEADER, &provider.cluster)?;
    if let Some((name, value)) = &provider.auth_header {
        host.set_request_header(name, value)?;
    }
    for (name, value) in &provider.extra_headers {
        host.set_request_header(name, value)?;
    }
    host.set_request_header("content-length", &body_len.to_string())?;
    Ok(())
}

fn model_not_found(model: &str) -> ApiError {
    ApiError::new(
        404,
        "invalid_request_error",
        Some("model_not_found"),
        format!(
            "The model `{model}` does not exist or you do not have access to it. \
             GET /v1/models lists the models this gateway serves."
        ),
    )
    .with_param("model")
}

fn invalid_type(param: &'static str, want: &str, got: Kind) -> ApiError {
    ApiError::invalid_request(
        Some("invalid_type"),
        format!(
            "Invalid type for '{param}': expected {want}, but got {}.",
            got.name()
        ),
    )
    .with_param(param)
}

fn internal(message: String) -> ApiError {
    log::error!("{message}");
    ApiError::new(
        500,
        "server_error",
        Some("gateway_error"),
        format!("Gateway error: {message}."),
    )
}

#[cfg(test)]
#[path = "filter_tests.rs"]
mod tests;
