//! OpenAI Chat Completions callers reaching models on AWS Bedrock through
//! the Converse API.
//!
//! * [`chat_request_to_converse`]: the caller's request body, rewritten for
//!   `POST /model/{modelId}/converse` or `/converse-stream` (the same body
//!   serves both; the model id lives in the path, not the body).
//! * [`converse_response_to_chat`], [`converse_error_to_chat`],
//!   [`caller_status`]: a non-streamed answer back into OpenAI's shapes.
//! * [`ConverseStreamToChat`]: the `application/vnd.amazon.eventstream`
//!   body of ConverseStream translated into `chat.completion.chunk` events,
//!   one upstream message at a time.
//!
//! Choices where Converse and OpenAI differ:
//! * `tool_choice: "none"`: Converse has no such mode. Without tool blocks in
//!   the conversation the tools are left out, which is exactly "none"; with
//!   tool blocks Bedrock requires a `toolConfig`, so the request is refused
//!   (400 `unsupported_parameter`) rather than letting the model call tools.
//! * `parallel_tool_calls: false`, `response_format` JSON modes,
//!   `reasoning_effort` other than none/minimal, `n` > 1, `http(s)` image
//!   URLs (Converse does not fetch URLs): 400 `unsupported_parameter`.
//! * Tool results are sent as `[{text}]` (the caller's string, verbatim),
//!   without `status`.
//! * Sampling knobs Converse lacks (`frequency_penalty`, `seed`,
//!   `logit_bias`, `user`, ...) are dropped, like the Anthropic translator.
//! * Converse answers carry no id: `chatcmpl-` plus 24 hex digits of a
//!   SHA-256 over the answer (for streams, over the first event's payload,
//!   which holds Bedrock's random `p` padding, and `created`).

use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::core::api_error::{error_type_for_status, ApiError};
use crate::core::json::from_slice_lossy;
use crate::core::sha256::{hex, Sha256};
use crate::core::usage::Usage;
use crate::providers::aws::eventstream::{Decoder, Message};
use crate::translate::chat_input::{
    bad_message, has_prefix_ignore_case, json_type, plain_text, quoted, unsupported,
};
use crate::translate::chat_output::{
    write_data, CachedTokens, ChatCompletion, ChatMessage, ChatUsage, Choice, Delta, FunctionCall,
    FunctionDelta, PivotChunks, ToolCall, ToolCallDelta,
};
use crate::translate::outbound::{request_body, ProviderTranslator, Upstream};
use crate::translate::pivot::{
    ChatRequest, ReasoningEffort, ResponseFormat, Role, Tool, ToolChoice,
};
use crate::translate::stream::{EventMapping, EventStream, Flow};
use crate::translate::{StreamFault, StreamTranslator};

/// What the filter needs to know about a translated request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConverseRequestInfo {
    /// Call `/converse-stream` (else `/converse`).
    pub stream: bool,
    /// `stream_options.include_usage`: send a final usage chunk.
    pub include_usage: bool,
}

// ---------------------------------------------------------------------------
// Request: OpenAI chat completions -> Bedrock Converse
// ---------------------------------------------------------------------------

fn text_block(text: String) -> Value {
    json!({ "text": text })
}

/// One Converse message: its role and content blocks.
type Turn = (&'static str, Vec<Value>);

/// Appends a turn, merging it into the previous one when the role repeats:
/// Converse wants user and assistant turns to alternate, and parallel tool
/// results in one user message.
fn push_turn(turns: &mut Vec<Turn>, role: &'static str, blocks: Vec<Value>) {
    if let Some((last_role, last)) = turns.last_mut() {
        if *last_role == role {
            last.extend(blocks);
            return;
        }
    }
    turns.push((role, blocks));
}

/// Converse's image `format` for a media type.
fn image_format(mime: &str) -> Option<&'static str> {
    Some(match mime.to_ascii_lowercase().as_str() {
        "image/png" => "png",
        "image/jpeg" | "image/jpg" => "jpeg",
        "image/gif" => "gif",
        "image/webp" => "webp",
        _ => return None,
    })
}

fn image_block(url: &str, i: usize, j: usize) -> Result<Value, ApiError> {
    let at = format!("messages[{i}].content[{j}].image_url.url");
    if let Some(rest) = url.strip_prefix("data:") {
        let parsed = rest
            .split_once(',')
            .and_then(|(meta, data)| Some((meta.strip_suffix(";base64")?, data)))
            .map(|(meta, data)| (meta.split(';').next().unwrap_or_default(), data));
        let Some((mime, data)) = parsed else {
            return Err(bad_message(format!(
                "{at}: only base64 data URLs (data:<media type>;base64,<data>) are supported."
            )));
        };
        let Some(format) = image_format(mime) else {
            return Err(bad_message(format!(
                "{at}: the image type '{mime}' is not supported by Bedrock; use image/png, \
                 image/jpeg, image/gif or image/webp."
            )));
        };
        return Ok(json!({"image": {"format": format, "source": {"bytes": data}}}));
    }
    if has_prefix_ignore_case(url, "https://") || has_prefix_ignore_case(url, "http://") {
        return Err(unsupported(
            "messages",
            format!(
                "{at}: Bedrock does not fetch images from URLs; send the image inline as a \
                 base64 data URL (data:image/png;base64,...)."
            ),
        ));
    }
    Err(bad_message(format!(
        "{at} must be a base64 data URL (http(s) URLs are not supported by Bedrock)."
    )))
}

fn user_part(part: &Value, i: usize, j: usize) -> Result<Value, ApiError> {
    let kind = part.get("type").and_then(Value::as_str).unwrap_or_default();
    match kind {
        "text" => {
            let text = part.get("text").and_then(Value::as_str).ok_or_else(|| {
                bad_message(format!("messages[{i}].content[{j}] has no string 'text'."))
            })?;
            Ok(text_block(text.to_string()))
        }
        "image_url" => {
            let url = match part.get("image_url") {
                Some(Value::String(url)) => Some(url.as_str()),
                Some(Value::Object(o)) => o.get("url").and_then(Value::as_str),
                _ => None,
            }
            .ok_or_else(|| {
                bad_message(format!(
                    "messages[{i}].content[{j}] has no string 'image_url.url'."
                ))
            })?;
            image_block(url, i, j)
        }
        "" => Err(bad_message(format!(
            "messages[{i}].content[{j}] has no 'type'."
        ))),
        other => Err(bad_message(format!(
            "messages[{i}].content[{j}]: content parts of type '{other}' are not supported \
             by the Bedrock provider through this gateway; use 'text' or 'image_url'."
        ))),
    }
}

fn user_blocks(content: &Value, i: usize) -> Result<Vec<Value>, ApiError> {
    match content {
        Value::String(s) => Ok(vec![text_block(s.clone())]),
        Value::Array(parts) => parts
            .iter()
            .enumerate()
            .map(|(j, p)| user_part(p, i, j))
            .collect(),
        other => Err(bad_message(format!(
            "messages[{i}].content must be a string or an array of content parts, not {}.",
            json_type(other)
        ))),
    }
}

/// `messages` split into Converse's `system` blocks and alternating turns;
/// also whether any tool block was seen.
fn convert_messages(chat: &ChatRequest<'_>) -> Result<(Vec<Value>, Vec<Turn>, bool), ApiError> {
    let mut system = Vec::new();
    let mut turns: Vec<Turn> = Vec::new();
    let mut tool_blocks = false;
    for message in chat.messages() {
        let message = message?;
        let (i, content) = (message.index, message.content());
        match message.role {
            Role::System => {
                let text = plain_text(content, i)?;
                if !text.is_empty() {
                    system.push(text_block(text));
                }
            }
            Role::User => push_turn(&mut turns, "user", user_blocks(content, i)?),
            Role::Assistant => {
                let blocks = message.assistant_blocks(
                    "Bedrock",
                    text_block,
                    |id, name, input| json!({"toolUse": {"toolUseId": id, "name": name, "input": input}}),
                )?;
                tool_blocks |= blocks.iter().any(|b| b.get("toolUse").is_some());
                if !blocks.is_empty() {
                    push_turn(&mut turns, "assistant", blocks);
                }
            }
            Role::Tool => {
                let result = json!({"toolResult": {
                    "toolUseId": message.tool_call_id()?,
                    "content": [text_block(plain_text(content, i)?)],
                }});
                tool_blocks = true;
                push_turn(&mut turns, "user", vec![result]);
            }
            Role::Other(role) => return Err(message.unsupported_role(role, "Bedrock")),
        }
    }
    if turns.is_empty() {
        return Err(bad_message(
            "'messages' must contain at least one user or assistant message.".into(),
        ));
    }
    Ok((system, turns, tool_blocks))
}

fn convert_tool(tool: &Tool<'_>) -> Value {
    let mut spec = Map::new();
    spec.insert("name".into(), Value::String(tool.name.to_string()));
    if let Some(d) = tool.description {
        spec.insert("description".into(), Value::String(d.to_string()));
    }
    let schema = match tool.parameters {
        None => json!({"type": "object", "properties": {}}),
        Some(p) => p.clone(),
    };
    spec.insert("inputSchema".into(), json!({ "json": schema }));
    json!({ "toolSpec": spec })
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ConverseRequest<'a> {
    messages: Vec<TurnOut>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    system: Vec<Value>,
    #[serde(skip_serializing_if = "InferenceConfig::is_empty")]
    inference_config: InferenceConfig<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_config: Option<Value>,
}

#[derive(Serialize)]
struct TurnOut {
    role: &'static str,
    content: Vec<Value>,
}

#[derive(Serialize, Default)]
#[serde(rename_all = "camelCase")]
struct InferenceConfig<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<&'a Value>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    stop_sequences: &'a [&'a str],
}

impl InferenceConfig<'_> {
    fn is_empty(&self) -> bool {
        self.max_tokens.is_none()
            && self.temperature.is_none()
            && self.top_p.is_none()
            && self.stop_sequences.is_empty()
    }
}

/// OpenAI chat completions request body -> Bedrock Converse request body.
/// `default_max_tokens` applies when the caller gives no limit; `None`
/// leaves the model's own default.
pub fn chat_request_to_converse(
    openai_body: &[u8],
    default_max_tokens: Option<u64>,
) -> Result<(Vec<u8>, ConverseRequestInfo), ApiError> {
    let req = crate::translate::request_object(openai_body)?;
    let chat = ChatRequest::parse(&req)?;
    let body = converse_request(&chat, default_max_tokens)?;
    Ok((
        body,
        ConverseRequestInfo {
            stream: chat.stream,
            include_usage: chat.include_usage,
        },
    ))
}

/// The pivot request as a Bedrock Converse request body.
pub fn converse_request(
    chat: &ChatRequest<'_>,
    default_max_tokens: Option<u64>,
) -> Result<Vec<u8>, ApiError> {
    if chat.n.is_some_and(|n| n > 1) {
        return Err(unsupported(
            "n",
            "The Bedrock provider does not support 'n' greater than 1 through this \
             gateway; send one request per choice."
                .into(),
        ));
    }
    if let Some(format @ (ResponseFormat::JsonObject | ResponseFormat::JsonSchema(_))) =
        chat.response_format
    {
        return Err(unsupported(
            "response_format",
            format!(
                "The Bedrock Converse API has no JSON mode, so 'response_format' of \
                 type '{}' is not supported; describe the format in the prompt or \
                 use a tool with an input schema instead.",
                format.kind()
            ),
        ));
    }
    if let Some(effort @ (ReasoningEffort::Low | ReasoningEffort::Medium | ReasoningEffort::High)) =
        chat.reasoning_effort
    {
        return Err(unsupported(
            "reasoning_effort",
            format!(
                "The Bedrock provider does not support 'reasoning_effort' '{}' \
                 through this gateway: Converse has no model-independent reasoning \
                 setting.",
                effort.name()
            ),
        ));
    }

    let (system, turns, has_tool_blocks) = convert_messages(chat)?;

    let tool_config = match chat.tool_choice {
        // No tools: nothing to configure ("auto"/"none" mean no tool use).
        _ if chat.tools.is_empty() => None,
        Some(ToolChoice::None) => {
            if has_tool_blocks {
                return Err(unsupported(
                    "tool_choice",
                    "The Bedrock Converse API has no 'none' tool choice, and a conversation \
                     holding tool calls must declare its tools; use 'auto', or leave the \
                     tool calls out of the history."
                        .into(),
                ));
            }
            // Tools left out: the model cannot call any, which is "none".
            None
        }
        choice => {
            if chat.parallel_tool_calls == Some(false) {
                return Err(unsupported(
                    "parallel_tool_calls",
                    "The Bedrock Converse API cannot turn off parallel tool calls; leave \
                     'parallel_tool_calls' unset or true."
                        .into(),
                ));
            }
            let mut config = Map::new();
            let tools = chat.tools.iter().map(convert_tool).collect();
            config.insert("tools".into(), Value::Array(tools));
            let converse_choice = match choice {
                None | Some(ToolChoice::None) => None,
                Some(ToolChoice::Auto) => Some(json!({"auto": {}})),
                Some(ToolChoice::Required) => Some(json!({"any": {}})),
                Some(ToolChoice::Named(name)) => Some(json!({"tool": {"name": name}})),
            };
            if let Some(c) = converse_choice {
                config.insert("toolChoice".into(), c);
            }
            Some(Value::Object(config))
        }
    };

    let out = ConverseRequest {
        messages: turns
            .into_iter()
            .map(|(role, content)| TurnOut { role, content })
            .collect(),
        system,
        inference_config: InferenceConfig {
            max_tokens: chat.max_tokens.or(default_max_tokens),
            temperature: chat.temperature,
            top_p: chat.top_p,
            stop_sequences: &chat.stop,
        },
        tool_config,
    };
    request_body(&out, "Converse")
}

// ---------------------------------------------------------------------------
// Responses: Converse -> OpenAI
// ---------------------------------------------------------------------------

/// Converse's usage fields as reported.
#[derive(Debug, Clone, Copy, Default)]
struct RawUsage {
    input: u64,
    output: u64,
    cache_read: u64,
    cache_write: u64,
}

impl RawUsage {
    fn from_value(usage: &Value) -> Self {
        let read = |name: &str| usage.get(name).and_then(Value::as_u64).unwrap_or(0);
        RawUsage {
            input: read("inputTokens"),
            output: read("outputTokens"),
            cache_read: read("cacheReadInputTokens"),
            cache_write: read("cacheWriteInputTokens"),
        }
    }

    /// Converse's `inputTokens` leaves out cached tokens; OpenAI's
    /// `prompt_tokens` counts them.
    fn prompt_tokens(&self) -> u64 {
        self.input
            .saturating_add(self.cache_read)
            .saturating_add(self.cache_write)
    }

    fn usage(&self) -> Usage {
        Usage {
            input_tokens: self.prompt_tokens(),
            output_tokens: self.output,
            cached_input_tokens: self.cache_read,
            reasoning_tokens: 0,
        }
    }

    fn chat(&self) -> ChatUsage {
        let prompt_tokens = self.prompt_tokens();
        ChatUsage {
            prompt_tokens,
            completion_tokens: self.output,
            total_tokens: prompt_tokens.saturating_add(self.output),
            prompt_tokens_details: CachedTokens {
                cached_tokens: self.cache_read,
            },
            completion_tokens_details: None,
        }
    }
}

/// Converse `stopReason` -> OpenAI `finish_reason`.
fn finish_reason(stop_reason: Option<&str>) -> &'static str {
    match stop_reason {
        Some("max_tokens" | "model_context_window_exceeded") => "length",
        Some("tool_use") => "tool_calls",
        Some("guardrail_intervened" | "content_filtered") => "content_filter",
        // end_turn, stop_sequence, unknown or absent.
        _ => "stop",
    }
}

/// `chatcmpl-` and 24 hex digits of SHA-256 over `parts`.
fn completion_id(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    let digest = h.finish();
    format!("chatcmpl-{}", hex(digest.get(..12).unwrap_or_default()))
}

/// Converse (non-streamed) response -> OpenAI chat.completion JSON.
/// `model` is the model name to report (Converse answers do not name it).
pub fn converse_response_to_chat(
    body: &[u8],
    model: &str,
    created: u64,
) -> Result<Vec<u8>, String> {
    let v: Value = from_slice_lossy(body)
        .map_err(|e| format!("the Converse response is not valid JSON: {e}"))?;
    let blocks = v
        .pointer("/output/message/content")
        .and_then(Value::as_array)
        .ok_or("the Converse response has no 'output.message.content' array")?;
    let mut text: Option<String> = None;
    let mut reasoning: Option<String> = None;
    let mut tool_calls = Vec::new();
    for block in blocks {
        if let Some(t) = block.get("text").and_then(Value::as_str) {
            text.get_or_insert_with(String::new).push_str(t);
        } else if let Some(t) = block
            .pointer("/reasoningContent/reasoningText/text")
            .and_then(Value::as_str)
        {
            reasoning.get_or_insert_with(String::new).push_str(t);
        } else if let Some(tool) = block.get("toolUse") {
            let empty = Value::Object(Map::new());
            let input = tool.get("input").unwrap_or(&empty);
            let arguments = serde_json::to_string(input)
                .map_err(|e| format!("could not serialize tool input: {e}"))?;
            let field = |name: &str| tool.get(name).and_then(Value::as_str).unwrap_or_default();
            tool_calls.push(ToolCall {
                id: field("toolUseId"),
                kind: "function",
                function: FunctionCall {
                    name: field("name"),
                    arguments,
                },
            });
        }
        // redactedContent, citations, images, ...: nothing OpenAI can show.
    }
    let usage = v.get("usage").map(RawUsage::from_value).unwrap_or_default();
    let id = completion_id(&[body]);
    let completion = ChatCompletion {
        id: &id,
        object: "chat.completion",
        created,
        model,
        choices: [Choice {
            index: 0,
            message: ChatMessage {
                role: "assistant",
                content: text,
                refusal: (),
                tool_calls,
                reasoning_content: reasoning,
            },
            logprobs: (),
            finish_reason: finish_reason(v.get("stopReason").and_then(Value::as_str)),
        }],
        usage: usage.chat(),
    };
    serde_json::to_vec(&completion).map_err(|e| format!("could not serialize the answer: {e}"))
}

/// What a Bedrock error type means for an OpenAI caller.
struct ErrorKind {
    status: u16,
    kind: &'static str,
    code: Option<&'static str>,
}

/// Bedrock error type (either case of the first letter: the stream's
/// `:exception-type` is lowerCamel) -> caller status, OpenAI type and code.
fn map_error_type(error_type: &str) -> Option<ErrorKind> {
    const TABLE: &[(&str, u16, &str, Option<&str>)] = &[
        (
            "ThrottlingException",
            429,
            "rate_limit_error",
            Some("rate_limit_exceeded"),
        ),
        (
            "ServiceQuotaExceededException",
            429,
            "rate_limit_error",
            Some("quota_exceeded"),
        ),
        (
            "ServiceUnavailableException",
            503,
            "server_error",
            Some("service_unavailable"),
        ),
        (
            "ModelNotReadyException",
            503,
            "server_error",
            Some("model_not_ready"),
        ),
        ("ValidationException", 400, "invalid_request_error", None),
        ("AccessDeniedException", 403, "permission_error", None),
        (
            "ResourceNotFoundException",
            404,
            "not_found_error",
            Some("model_not_found"),
        ),
        (
            "ModelTimeoutException",
            504,
            "server_error",
            Some("model_timeout"),
        ),
        (
            "ModelErrorException",
            502,
            "server_error",
            Some("model_error"),
        ),
        (
            "ModelStreamErrorException",
            502,
            "server_error",
            Some("model_error"),
        ),
        ("InternalServerException", 500, "server_error", None),
        (
            "UnrecognizedClientException",
            401,
            "authentication_error",
            Some("provider_authentication_failed"),
        ),
        (
            "InvalidSignatureException",
            401,
            "authentication_error",
            Some("provider_authentication_failed"),
        ),
        (
            "ExpiredTokenException",
            401,
            "authentication_error",
            Some("provider_authentication_failed"),
        ),
        (
            "IncompleteSignatureException",
            401,
            "authentication_error",
            Some("provider_authentication_failed"),
        ),
        (
            "MissingAuthenticationTokenException",
            401,
            "authentication_error",
            Some("provider_authentication_failed"),
        ),
    ];
    // "ThrottlingException:http://internal.amazon.com/coral/..." -> the name;
    // "com.amazon.coral.service#ThrottlingException" -> the name.
    let name = error_type.split(':').next().unwrap_or_default();
    let name = name.rsplit('#').next().unwrap_or_default().trim();
    TABLE
        .iter()
        .find(|(n, ..)| n.eq_ignore_ascii_case(name))
        .map(|&(_, status, kind, code)| ErrorKind { status, kind, code })
}

/// The status the OpenAI caller gets for a Bedrock error:
///
/// | Bedrock error type                    | Bedrock | caller |
/// |---------------------------------------|---------|--------|
/// | ThrottlingException                   | 429     | 429    |
/// | ServiceQuotaExceededException         | 400     | 429    |
/// | ServiceUnavailableException           | 503     | 503    |
/// | ModelNotReadyException                | 429     | 503    |
/// | ValidationException                   | 400     | 400    |
/// | AccessDeniedException                 | 403     | 403    |
/// | ResourceNotFoundException             | 404     | 404    |
/// | ModelTimeoutException                 | 408     | 504 (the model timed out, not the caller) |
/// | ModelErrorException, ModelStreamError | 424     | 502    |
/// | InternalServerException               | 500     | 500    |
/// | UnrecognizedClient, InvalidSignature, ExpiredToken, ... | 403/400 | 401 (the gateway's AWS credentials) |
///
/// Without a known type: 408 -> 504, 424 -> 502, anything else unchanged.
pub fn caller_status(bedrock_status: u16, error_type: Option<&str>) -> u16 {
    match error_type.and_then(map_error_type) {
        Some(k) => k.status,
        None => match bedrock_status {
            408 => 504,
            424 => 502,
            other => other,
        },
    }
}

/// Bedrock error reply -> OpenAI error JSON `{"error":{"message","type","param":null,"code"}}`.
/// `error_type` is the `x-amzn-errortype` response header value (e.g.
/// "ThrottlingException:http://internal.amazon.com/coral/com.amazon.bedrock/"), if any;
/// without it the body's `__type` is used. The body is `{"message": ...}`
/// (sometimes `"Message"`); other bodies are quoted (at most 512 bytes).
pub fn converse_error_to_chat(status: u16, error_type: Option<&str>, body: &[u8]) -> Vec<u8> {
    let parsed: Option<Value> = from_slice_lossy(body).ok();
    let body_type = parsed
        .as_ref()
        .and_then(|v| v.get("__type"))
        .and_then(Value::as_str);
    let error_type = error_type.or(body_type);
    let caller = caller_status(status, error_type);
    let (kind, code) = match error_type.and_then(map_error_type) {
        Some(k) => (k.kind, k.code),
        None => (error_type_for_status(caller), None),
    };
    let message = parsed
        .as_ref()
        .and_then(|v| {
            v.get("message")
                .or_else(|| v.get("Message"))
                .and_then(Value::as_str)
        })
        .map(str::to_string)
        .unwrap_or_else(|| {
            let text = quoted(body);
            if text.is_empty() {
                format!("The Bedrock API returned HTTP {status} with no details.")
            } else {
                format!("The Bedrock API returned HTTP {status}: {text}")
            }
        });
    ApiError::new(caller, kind, code, message).body()
}

// ---------------------------------------------------------------------------
// Streaming: ConverseStream event-stream -> OpenAI chat.completion.chunk SSE
// ---------------------------------------------------------------------------

/// Streaming: ConverseStream's `application/vnd.amazon.eventstream` bytes
/// in, OpenAI chat.completion.chunk SSE bytes out.
///
/// The stream completes with `messageStop` (the finish reason) and then
/// `metadata` (usage); once both came, the usage chunk (with
/// include_usage) and `[DONE]` are written. Exception frames, a corrupt
/// frame, or an end before both become an OpenAI error event, no `[DONE]`.
pub type ConverseStreamToChat = EventStream<Decoder, ConverseEvents>;

impl ConverseStreamToChat {
    /// `model` is the model name to report in the chunks.
    pub fn new(include_usage: bool, model: &str, created: u64) -> Self {
        EventStream::reading(
            Decoder::new(),
            ConverseEvents {
                chunks: PivotChunks::new(include_usage, model, created),
                tool_blocks: Vec::new(),
                usage: None,
                stopped: false,
            },
        )
    }
}

/// The per-message mapping of [`ConverseStreamToChat`].
pub struct ConverseEvents {
    chunks: PivotChunks,
    /// Converse content-block index -> OpenAI tool-call index.
    tool_blocks: Vec<(u64, usize)>,
    usage: Option<RawUsage>,
    stopped: bool,
}

impl EventMapping for ConverseEvents {
    type Event = Message;
    const UPSTREAM: &'static str = "Bedrock";

    fn on_event(&mut self, message: Message, out: &mut Vec<u8>) -> Result<Flow, StreamFault> {
        self.handle(&message, out)
    }

    fn write_error(&mut self, error: &ApiError, out: &mut Vec<u8>) {
        write_data(out, &error.body());
    }

    fn usage(&self) -> Option<Usage> {
        self.usage.map(|u| u.usage())
    }
}

impl ConverseEvents {
    fn emit(&self, out: &mut Vec<u8>, delta: Delta<'_>, finish: Option<&'static str>) {
        self.chunks.delta(out, 0, delta, finish);
    }

    fn emit_tool(&self, out: &mut Vec<u8>, call: ToolCallDelta<'_>) {
        let delta = Delta {
            tool_calls: Some([call]),
            ..Delta::default()
        };
        self.emit(out, delta, None);
    }

    /// Writes the end once both messageStop and metadata have come.
    fn maybe_done(&mut self, out: &mut Vec<u8>) -> Flow {
        let Some(usage) = self.usage.filter(|_| self.stopped) else {
            return Flow::Open;
        };
        self.chunks.end(out, usage.chat());
        Flow::Ended
    }

    fn handle(&mut self, message: &Message, out: &mut Vec<u8>) -> Result<Flow, StreamFault> {
        if self.chunks.id.is_empty() {
            let created = self.chunks.created.to_be_bytes();
            self.chunks.id = completion_id(&[&message.payload, &created]);
        }
        match message.header_str(":message-type").unwrap_or("event") {
            "event" => {}
            "exception" => {
                let kind = message.header_str(":exception-type");
                let status = caller_status(500, kind);
                let error = converse_error_to_chat(status, kind, &message.payload);
                write_data(out, &error);
                return Ok(Flow::Ended);
            }
            "error" => {
                let code = message.header_str(":error-code");
                let text = message.header_str(":error-message").unwrap_or_default();
                let body = json!({ "message": text }).to_string();
                let error = converse_error_to_chat(caller_status(500, code), code, body.as_bytes());
                write_data(out, &error);
                return Ok(Flow::Ended);
            }
            other => {
                log::warn!("ignoring a Bedrock stream message of type {other:?}");
                return Ok(Flow::Open);
            }
        }
        let kind = message.header_str(":event-type").unwrap_or_default();
        let Ok(v) = from_slice_lossy::<Value>(&message.payload) else {
            log::warn!("a Bedrock {kind:?} event's payload is not JSON");
            return Err(StreamFault::Corrupt);
        };
        match kind {
            "messageStart" => {
                let delta = Delta {
                    role: Some("assistant"),
                    content: Some(""),
                    ..Delta::default()
                };
                self.emit(out, delta, None);
            }
            "contentBlockStart" => {
                let Some(tool) = v.pointer("/start/toolUse") else {
                    return Ok(Flow::Open);
                };
                let index = v
                    .get("contentBlockIndex")
                    .and_then(Value::as_u64)
                    .unwrap_or_default();
                let k = self.tool_blocks.len();
                self.tool_blocks.push((index, k));
                let field = |name: &str| tool.get(name).and_then(Value::as_str).unwrap_or_default();
                self.emit_tool(
                    out,
                    ToolCallDelta {
                        index: k,
                        id: Some(field("toolUseId")),
                        kind: Some("function"),
                        function: FunctionDelta {
                            name: Some(field("name")),
                            arguments: "",
                        },
                        extra_content: None,
                    },
                );
            }
            "contentBlockDelta" => {
                let Some(d) = v.get("delta") else {
                    return Ok(Flow::Open);
                };
                if let Some(text) = d.get("text").and_then(Value::as_str) {
                    let delta = Delta {
                        content: Some(text),
                        ..Delta::default()
                    };
                    self.emit(out, delta, None);
                } else if let Some(text) =
                    d.pointer("/reasoningContent/text").and_then(Value::as_str)
                {
                    let delta = Delta {
                        reasoning_content: Some(text),
                        ..Delta::default()
                    };
                    self.emit(out, delta, None);
                } else if let Some(input) = d.pointer("/toolUse/input").and_then(Value::as_str) {
                    let index = v.get("contentBlockIndex").and_then(Value::as_u64);
                    let k = self
                        .tool_blocks
                        .iter()
                        .find(|(block, _)| Some(*block) == index)
                        .map(|(_, k)| *k);
                    let Some(k) = k else {
                        log::warn!("ignoring tool input for an unknown Converse block {index:?}");
                        return Ok(Flow::Open);
                    };
                    self.emit_tool(
                        out,
                        ToolCallDelta {
                            index: k,
                            id: None,
                            kind: None,
                            function: FunctionDelta {
                                name: None,
                                arguments: input,
                            },
                            extra_content: None,
                        },
                    );
                }
                // reasoningContent.signature / redactedContent, citations:
                // nothing to show.
            }
            "messageStop" => {
                if self.stopped {
                    return Ok(Flow::Open);
                }
                self.stopped = true;
                let stop_reason = v.get("stopReason").and_then(Value::as_str);
                self.emit(out, Delta::default(), Some(finish_reason(stop_reason)));
                return Ok(self.maybe_done(out));
            }
            "metadata" => {
                let usage = v.get("usage").map(RawUsage::from_value).unwrap_or_default();
                self.usage = Some(usage);
                return Ok(self.maybe_done(out));
            }
            // contentBlockStop, and event types added later.
            _ => {}
        }
        Ok(Flow::Open)
    }
}

// ---------------------------------------------------------------------------

/// AWS Bedrock Converse.
pub struct Bedrock;
impl ProviderTranslator for Bedrock {
    fn request_from_pivot(
        &self,
        chat: &ChatRequest<'_>,
        upstream: &Upstream<'_>,
    ) -> Result<Vec<u8>, ApiError> {
        converse_request(chat, Some(upstream.default_max_tokens))
    }
    fn answer_to_pivot(&self, body: &[u8], model: &str, created: u64) -> Result<Vec<u8>, String> {
        converse_response_to_chat(body, model, created)
    }
    fn caller_status(&self, status: u16, error_type: Option<&str>) -> u16 {
        caller_status(status, error_type)
    }
    fn error_to_pivot(&self, status: u16, error_type: Option<&str>, body: &[u8]) -> Vec<u8> {
        converse_error_to_chat(status, error_type, body)
    }
    fn stream_to_pivot(
        &self,
        include_usage: bool,
        model: &str,
        created: u64,
    ) -> Box<dyn StreamTranslator> {
        Box::new(ConverseStreamToChat::new(include_usage, model, created))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::aws::eventstream::encode;
    use crate::translate::StreamTranslator;
    use std::collections::BTreeMap;

    const TEXT_STREAM: &str = include_str!("../../../tests/fixtures/bedrock/text_stream.json");
    const TOOL_STREAM: &str = include_str!("../../../tests/fixtures/bedrock/tool_stream.json");
    const TOOL_RESPONSE: &str =
        include_str!("../../../tests/fixtures/bedrock/response_tool_use.json");
    const TEXT_RESPONSE: &str = include_str!("../../../tests/fixtures/bedrock/response_text.json");
    const CREATED: u64 = 1_700_000_000;
    const MODEL: &str = "anthropic.claude-3-5-sonnet-20240620-v1:0";

    // ----- requests --------------------------------------------------------

    fn translate_with(
        req: &Value,
        default_max_tokens: Option<u64>,
    ) -> (Value, ConverseRequestInfo) {
        let body = serde_json::to_vec(req).unwrap();
        let (out, info) = chat_request_to_converse(&body, default_max_tokens).unwrap();
        (serde_json::from_slice(&out).unwrap(), info)
    }

    fn translate(req: &Value) -> Value {
        translate_with(req, Some(1024)).0
    }

    fn with_messages(messages: Value) -> Value {
        json!({"model": "claude", "messages": messages})
    }

    #[test]
    fn request_table() {
        let weather_schema = json!({
            "type": "object",
            "properties": {"location": {"type": "string"}},
            "required": ["location"]
        });
        let table: Vec<(&str, Value, Value)> = vec![
            (
                "plain text",
                with_messages(json!([{"role": "user", "content": "Hello"}])),
                json!({"messages": [{"role": "user", "content": [{"text": "Hello"}]}],
                       "inferenceConfig": {"maxTokens": 1024}}),
            ),
            (
                "system and developer prompts anywhere, in order; users around them merged",
                with_messages(json!([
                    {"role": "system", "content": "You are terse."},
                    {"role": "user", "content": "Hi"},
                    {"role": "developer", "content": [
                        {"type": "text", "text": "Answer in French."},
                        {"type": "text", "text": " Always."}]},
                    {"role": "user", "content": "there"},
                    {"role": "assistant", "content": "Bonjour"},
                    {"role": "system", "content": ""},
                    {"role": "user", "content": "Encore"}
                ])),
                json!({"system": [{"text": "You are terse."}, {"text": "Answer in French. Always."}],
                       "messages": [
                           {"role": "user", "content": [{"text": "Hi"}, {"text": "there"}]},
                           {"role": "assistant", "content": [{"text": "Bonjour"}]},
                           {"role": "user", "content": [{"text": "Encore"}]}],
                       "inferenceConfig": {"maxTokens": 1024}}),
            ),
            (
                "multi-turn with sampling parameters; unmappable fields dropped",
                json!({"model": "claude",
                       "messages": [
                           {"role": "user", "content": "What is 2+2?"},
                           {"role": "assistant", "content": "4"},
                           {"role": "user", "content": "And times 3?"}],
                       "max_tokens": 200, "temperature": 0.2, "top_p": 0.9, "stop": "END",
                       "user": "user-123", "stream": true,
                       "stream_options": {"include_usage": true},
                       "frequency_penalty": 0.5, "presence_penalty": 0.1, "seed": 7,
                       "logit_bias": {"50256": -100}, "logprobs": false, "top_logprobs": null,
                       "service_tier": "auto", "store": true, "metadata": {"k": "v"}, "n": 1,
                       "response_format": {"type": "text"}, "reasoning_effort": "none"}),
                json!({"messages": [
                           {"role": "user", "content": [{"text": "What is 2+2?"}]},
                           {"role": "assistant", "content": [{"text": "4"}]},
                           {"role": "user", "content": [{"text": "And times 3?"}]}],
                       "inferenceConfig": {"maxTokens": 200, "temperature": 0.2, "topP": 0.9,
                                           "stopSequences": ["END"]}}),
            ),
            (
                "stop array; max_completion_tokens wins over max_tokens",
                json!({"model": "claude", "messages": [{"role": "user", "content": "Count"}],
                       "stop": ["\n\nHuman:", "STOP"], "max_completion_tokens": 300,
                       "max_tokens": 50}),
                json!({"messages": [{"role": "user", "content": [{"text": "Count"}]}],
                       "inferenceConfig": {"maxTokens": 300,
                                           "stopSequences": ["\n\nHuman:", "STOP"]}}),
            ),
            (
                "images: base64 data URLs of each format",
                with_messages(json!([{"role": "user", "content": [
                    {"type": "text", "text": "What is in these?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                    {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ", "detail": "low"}},
                    {"type": "image_url", "image_url": "data:image/gif;base64,R0lGODlh"},
                    {"type": "image_url", "image_url": {"url": "data:image/webp;name=x.webp;base64,UklGRg=="}}
                ]}])),
                json!({"messages": [{"role": "user", "content": [
                    {"text": "What is in these?"},
                    {"image": {"format": "png", "source": {"bytes": "iVBORw0KGgo="}}},
                    {"image": {"format": "jpeg", "source": {"bytes": "/9j/4AAQ"}}},
                    {"image": {"format": "gif", "source": {"bytes": "R0lGODlh"}}},
                    {"image": {"format": "webp", "source": {"bytes": "UklGRg=="}}}
                ]}], "inferenceConfig": {"maxTokens": 1024}}),
            ),
            (
                "tools, parallel tool calls, tool results merged into one user turn",
                json!({"model": "claude",
                       "messages": [
                           {"role": "user", "content": "Weather in Paris and the time there?"},
                           {"role": "assistant", "content": null, "tool_calls": [
                               {"id": "call_1", "type": "function", "function":
                                   {"name": "get_weather", "arguments": "{\"location\":\"Paris\"}"}},
                               {"id": "call_2", "type": "function", "function":
                                   {"name": "get_time", "arguments": ""}}]},
                           {"role": "tool", "tool_call_id": "call_1", "content": "18°C, cloudy"},
                           {"role": "tool", "tool_call_id": "call_2", "content": [
                               {"type": "text", "text": "14:05"}, {"type": "text", "text": " CET"}]},
                           {"role": "user", "content": "Thanks! Summarise."}],
                       "tools": [
                           {"type": "function", "function": {"name": "get_weather",
                               "description": "Current weather", "parameters": weather_schema,
                               "strict": true}},
                           {"type": "function", "function": {"name": "get_time"}}],
                       "tool_choice": "required", "parallel_tool_calls": true}),
                json!({"messages": [
                           {"role": "user", "content": [{"text": "Weather in Paris and the time there?"}]},
                           {"role": "assistant", "content": [
                               {"toolUse": {"toolUseId": "call_1", "name": "get_weather",
                                            "input": {"location": "Paris"}}},
                               {"toolUse": {"toolUseId": "call_2", "name": "get_time", "input": {}}}]},
                           {"role": "user", "content": [
                               {"toolResult": {"toolUseId": "call_1", "content": [{"text": "18°C, cloudy"}]}},
                               {"toolResult": {"toolUseId": "call_2", "content": [{"text": "14:05 CET"}]}},
                               {"text": "Thanks! Summarise."}]}],
                       "inferenceConfig": {"maxTokens": 1024},
                       "toolConfig": {
                           "tools": [
                               {"toolSpec": {"name": "get_weather", "description": "Current weather",
                                             "inputSchema": {"json": weather_schema}}},
                               {"toolSpec": {"name": "get_time",
                                             "inputSchema": {"json": {"type": "object", "properties": {}}}}}],
                           "toolChoice": {"any": {}}}}),
            ),
            (
                "assistant text with tool call; reasoning_content dropped; \
                 consecutive assistants merged; empty assistant skipped",
                with_messages(json!([
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": ""},
                    {"role": "user", "content": "b"},
                    {"role": "assistant", "content": "Part one."},
                    {"role": "assistant", "content": [{"type": "text", "text": "Let me check."}],
                     "reasoning_content": "secret thoughts",
                     "tool_calls": [{"id": "tooluse_9", "type": "function", "function":
                         {"name": "lookup", "arguments": "{\"q\": [1, {\"x\": null}]}"}}]},
                    {"role": "tool", "tool_call_id": "tooluse_9", "content": "found"}
                ])),
                json!({"messages": [
                           {"role": "user", "content": [{"text": "a"}, {"text": "b"}]},
                           {"role": "assistant", "content": [
                               {"text": "Part one."},
                               {"text": "Let me check."},
                               {"toolUse": {"toolUseId": "tooluse_9", "name": "lookup",
                                            "input": {"q": [1, {"x": null}]}}}]},
                           {"role": "user", "content": [
                               {"toolResult": {"toolUseId": "tooluse_9", "content": [{"text": "found"}]}}]}],
                       "inferenceConfig": {"maxTokens": 1024}}),
            ),
        ];
        for (name, input, expected) in table {
            assert_eq!(translate(&input), expected, "{name}");
        }
    }

    #[test]
    fn request_info_reports_stream_and_usage() {
        let base = with_messages(json!([{"role": "user", "content": "x"}]));
        let cases = [
            (json!({}), false, false),
            (json!({"stream": false}), false, false),
            (json!({"stream": null}), false, false),
            (json!({"stream": true}), true, false),
            (
                json!({"stream": true, "stream_options": {"include_usage": false}}),
                true,
                false,
            ),
            (
                json!({"stream": true, "stream_options": {"include_usage": true}}),
                true,
                true,
            ),
        ];
        for (extra, stream, include_usage) in cases {
            let mut req = base.clone();
            req.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let (out, info) = translate_with(&req, Some(1024));
            assert_eq!(
                info,
                ConverseRequestInfo {
                    stream,
                    include_usage
                },
                "{extra}"
            );
            // The endpoint says it; the body never does.
            assert!(out.get("stream").is_none(), "{extra}");
            assert!(out.get("stream_options").is_none(), "{extra}");
            assert!(out.get("model").is_none(), "{extra}");
        }
    }

    #[test]
    fn default_max_tokens_applies_only_when_none_given() {
        let req = with_messages(json!([{"role": "user", "content": "x"}]));
        assert_eq!(
            translate_with(&req, Some(4096)).0["inferenceConfig"]["maxTokens"],
            4096
        );
        // No default and none given: no inferenceConfig at all.
        assert!(translate_with(&req, None)
            .0
            .get("inferenceConfig")
            .is_none());
        let mut given = req.clone();
        given["max_tokens"] = json!(77);
        assert_eq!(
            translate_with(&given, Some(4096)).0["inferenceConfig"]["maxTokens"],
            77
        );
        assert_eq!(
            translate_with(&given, None).0["inferenceConfig"]["maxTokens"],
            77
        );
        given["max_tokens"] = Value::Null;
        assert_eq!(
            translate_with(&given, Some(4096)).0["inferenceConfig"]["maxTokens"],
            4096
        );
    }

    #[test]
    fn tool_choice_table() {
        let tools = json!([{"type": "function", "function": {"name": "get_weather"}}]);
        // (case, extra, expected toolChoice; None: toolConfig absent)
        let table: Vec<(&str, Value, Option<Value>)> = vec![
            ("absent", json!({}), Some(Value::Null)),
            (
                "auto",
                json!({"tool_choice": "auto"}),
                Some(json!({"auto": {}})),
            ),
            (
                "required",
                json!({"tool_choice": "required"}),
                Some(json!({"any": {}})),
            ),
            (
                "named function",
                json!({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
                Some(json!({"tool": {"name": "get_weather"}})),
            ),
            ("none: tools left out", json!({"tool_choice": "none"}), None),
            (
                "none ignores parallel_tool_calls",
                json!({"tool_choice": "none", "parallel_tool_calls": false}),
                None,
            ),
            (
                "parallel on",
                json!({"parallel_tool_calls": true}),
                Some(Value::Null),
            ),
        ];
        for (name, extra, expected) in table {
            let mut req = with_messages(json!([{"role": "user", "content": "x"}]));
            req["tools"] = tools.clone();
            req.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let out = translate(&req);
            match expected {
                None => assert!(out.get("toolConfig").is_none(), "{name}"),
                Some(choice) => {
                    let config = &out["toolConfig"];
                    assert_eq!(
                        config["tools"][0]["toolSpec"]["name"], "get_weather",
                        "{name}"
                    );
                    assert_eq!(
                        config.get("toolChoice").cloned().unwrap_or(Value::Null),
                        choice,
                        "{name}"
                    );
                }
            }
        }
        // Without tools, "auto"/"none" and parallel_tool_calls mean nothing.
        for extra in [
            json!({"tool_choice": "auto"}),
            json!({"tool_choice": "none", "parallel_tool_calls": false}),
            json!({"tools": [], "tool_choice": "auto"}),
        ] {
            let mut req = with_messages(json!([{"role": "user", "content": "x"}]));
            req.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            assert!(translate(&req).get("toolConfig").is_none(), "{extra}");
        }
    }

    #[test]
    fn request_error_table() {
        let user = r#"[{"role":"user","content":"x"}]"#;
        let with = |extra: &str| format!(r#"{{"model":"m","messages":{user},{extra}}}"#);
        let tools = r#""tools":[{"type":"function","function":{"name":"f"}}]"#;
        let tool_history = r#"[{"role":"user","content":"x"},{"role":"assistant","tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{}"}}]},{"role":"tool","tool_call_id":"c1","content":"r"}]"#;
        // (case, body, param, code)
        let table: Vec<(&str, String, Option<&str>, Option<&str>)> = vec![
            ("not json", "{".into(), None, Some("invalid_json")),
            ("not an object", "[1,2]".into(), None, Some("invalid_json")),
            (
                "messages missing",
                r#"{"model":"m"}"#.into(),
                Some("messages"),
                Some("missing_required_parameter"),
            ),
            (
                "messages not an array",
                r#"{"model":"m","messages":"hi"}"#.into(),
                Some("messages"),
                Some("invalid_type"),
            ),
            (
                "only a system message",
                r#"{"model":"m","messages":[{"role":"system","content":"s"}]}"#.into(),
                Some("messages"),
                Some("invalid_value"),
            ),
            (
                "unknown role",
                r#"{"model":"m","messages":[{"role":"function","name":"f","content":"x"}]}"#
                    .into(),
                Some("messages"),
                Some("invalid_value"),
            ),
            (
                "user without content",
                r#"{"model":"m","messages":[{"role":"user"}]}"#.into(),
                Some("messages"),
                Some("invalid_value"),
            ),
            (
                "audio part",
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"input_audio","input_audio":{"data":"AA==","format":"wav"}}]}]}"#.into(),
                Some("messages"),
                Some("invalid_value"),
            ),
            (
                "image by https URL: Converse does not fetch",
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://example.com/cat.png"}}]}]}"#.into(),
                Some("messages"),
                Some("unsupported_parameter"),
            ),
            (
                "image by http URL",
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"HTTP://example.com/cat.png"}}]}]}"#.into(),
                Some("messages"),
                Some("unsupported_parameter"),
            ),
            (
                "image with ftp URL",
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"ftp://x/y.png"}}]}]}"#.into(),
                Some("messages"),
                Some("invalid_value"),
            ),
            (
                "image data URL not base64",
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/png,abc"}}]}]}"#.into(),
                Some("messages"),
                Some("invalid_value"),
            ),
            (
                "image of an unsupported type",
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/tiff;base64,AAAA"}}]}]}"#.into(),
                Some("messages"),
                Some("invalid_value"),
            ),
            (
                "invalid tool arguments",
                r#"{"model":"m","messages":[{"role":"user","content":"x"},{"role":"assistant","tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{\"a\":"}}]}]}"#.into(),
                Some("messages"),
                Some("invalid_value"),
            ),
            (
                "tool arguments not an object",
                r#"{"model":"m","messages":[{"role":"user","content":"x"},{"role":"assistant","tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"[1,2]"}}]}]}"#.into(),
                Some("messages"),
                Some("invalid_value"),
            ),
            (
                "tool message without id",
                r#"{"model":"m","messages":[{"role":"user","content":"x"},{"role":"tool","content":"r"}]}"#.into(),
                Some("messages"),
                Some("invalid_value"),
            ),
            (
                "response_format json_object",
                with(r#""response_format":{"type":"json_object"}"#),
                Some("response_format"),
                Some("unsupported_parameter"),
            ),
            (
                "response_format json_schema",
                with(r#""response_format":{"type":"json_schema","json_schema":{"name":"x","schema":{}}}"#),
                Some("response_format"),
                Some("unsupported_parameter"),
            ),
            (
                "response_format unknown",
                with(r#""response_format":{"type":"yaml"}"#),
                Some("response_format"),
                Some("invalid_value"),
            ),
            ("n = 2", with(r#""n":2"#), Some("n"), Some("unsupported_parameter")),
            ("n = 0", with(r#""n":0"#), Some("n"), Some("invalid_value")),
            ("n a string", with(r#""n":"1""#), Some("n"), Some("invalid_type")),
            (
                "reasoning_effort high",
                with(r#""reasoning_effort":"high""#),
                Some("reasoning_effort"),
                Some("unsupported_parameter"),
            ),
            (
                "reasoning_effort unknown",
                with(r#""reasoning_effort":"max""#),
                Some("reasoning_effort"),
                Some("invalid_value"),
            ),
            (
                "max_tokens zero",
                with(r#""max_tokens":0"#),
                Some("max_tokens"),
                Some("invalid_value"),
            ),
            (
                "max_completion_tokens negative",
                with(r#""max_completion_tokens":-5"#),
                Some("max_completion_tokens"),
                Some("invalid_type"),
            ),
            (
                "temperature a string",
                with(r#""temperature":"hot""#),
                Some("temperature"),
                Some("invalid_type"),
            ),
            ("stop a number", with(r#""stop":5"#), Some("stop"), Some("invalid_type")),
            ("stream a string", with(r#""stream":"yes""#), Some("stream"), Some("invalid_type")),
            (
                "tools not an array",
                with(r#""tools":{}"#),
                Some("tools"),
                Some("invalid_type"),
            ),
            (
                "tool without a name",
                with(r#""tools":[{"type":"function","function":{}}]"#),
                Some("tools"),
                Some("invalid_value"),
            ),
            (
                "tool_choice required without tools",
                with(r#""tool_choice":"required""#),
                Some("tool_choice"),
                Some("invalid_value"),
            ),
            (
                "tool_choice unknown",
                with(&format!(r#"{tools},"tool_choice":"sometimes""#)),
                Some("tool_choice"),
                Some("invalid_value"),
            ),
            (
                "parallel_tool_calls false",
                with(&format!(r#"{tools},"parallel_tool_calls":false"#)),
                Some("parallel_tool_calls"),
                Some("unsupported_parameter"),
            ),
            (
                "tool_choice none with tool calls in the history",
                format!(r#"{{"model":"m","messages":{tool_history},{tools},"tool_choice":"none"}}"#),
                Some("tool_choice"),
                Some("unsupported_parameter"),
            ),
        ];
        for (name, body, param, code) in table {
            let err = chat_request_to_converse(body.as_bytes(), Some(1024)).unwrap_err();
            assert_eq!(err.status, 400, "{name}");
            assert_eq!(err.kind, "invalid_request_error", "{name}");
            assert_eq!(err.param, param, "{name}: {}", err.message);
            assert_eq!(err.code, code, "{name}: {}", err.message);
            assert!(!err.message.is_empty(), "{name}");
        }
    }

    // ----- non-streamed responses -----------------------------------------

    #[test]
    fn tool_use_response_translates() {
        let out = converse_response_to_chat(TOOL_RESPONSE.as_bytes(), MODEL, CREATED).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        let id = v["id"].as_str().unwrap();
        assert!(id.starts_with("chatcmpl-") && id.len() == 9 + 24, "{id}");
        let expected = json!({
            "id": id,
            "object": "chat.completion",
            "created": CREATED,
            "model": MODEL,
            "choices": [{
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "I'll check both cities.",
                    "refusal": null,
                    "reasoning_content": "Two independent lookups; call both tools.",
                    "tool_calls": [
                        {"id": "tooluse_kZJMlvQmRJ6eAyJE5GIl7Q", "type": "function",
                         "function": {"name": "get_weather",
                                      "arguments": "{\"location\":\"San Francisco, CA\",\"unit\":\"celsius\"}"}},
                        {"id": "tooluse_Wq3BzbMaT0O9mX8p2vRu4A", "type": "function",
                         "function": {"name": "get_weather",
                                      "arguments": "{\"days\":[1,2],\"detail\":{\"hourly\":false},\"location\":\"Zürich \\\"ZH\\\"\",\"unit\":\"celsius\"}"}}
                    ]
                },
                "logprobs": null,
                "finish_reason": "tool_calls"
            }],
            "usage": {"prompt_tokens": 2095, "completion_tokens": 503, "total_tokens": 2598,
                      "prompt_tokens_details": {"cached_tokens": 1800}}
        });
        assert_eq!(v, expected);
        // The same answer gets the same id; another answer another.
        let again = converse_response_to_chat(TOOL_RESPONSE.as_bytes(), MODEL, CREATED).unwrap();
        assert_eq!(out, again);
        let text = converse_response_to_chat(TEXT_RESPONSE.as_bytes(), MODEL, CREATED).unwrap();
        let text: Value = serde_json::from_slice(&text).unwrap();
        assert_ne!(text["id"], v["id"]);
    }

    #[test]
    fn text_response_translates() {
        let out = converse_response_to_chat(TEXT_RESPONSE.as_bytes(), "my-alias", 5).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["model"], "my-alias");
        assert_eq!(v["created"], 5);
        let message = &v["choices"][0]["message"];
        assert_eq!(
            message["content"],
            "Hello, café ☕ — ça va? 👋\nSecond line."
        );
        assert!(message.get("tool_calls").is_none());
        assert!(message.get("reasoning_content").is_none());
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21,
                   "prompt_tokens_details": {"cached_tokens": 0}})
        );
    }

    #[test]
    fn stop_reason_table() {
        let table = [
            ("end_turn", "stop"),
            ("stop_sequence", "stop"),
            ("max_tokens", "length"),
            ("model_context_window_exceeded", "length"),
            ("tool_use", "tool_calls"),
            ("guardrail_intervened", "content_filter"),
            ("content_filtered", "content_filter"),
            ("something_new", "stop"),
        ];
        for (stop, finish) in table {
            let body = json!({"output": {"message": {"role": "assistant",
                              "content": [{"text": "x"}]}}, "stopReason": stop});
            let out = converse_response_to_chat(body.to_string().as_bytes(), MODEL, 1).unwrap();
            let v: Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(v["choices"][0]["finish_reason"], finish, "{stop}");
            // No usage reported: zeros, not a missing object.
            assert_eq!(v["usage"]["total_tokens"], 0);
        }
        let body = json!({"output": {"message": {"role": "assistant", "content": []}}});
        let out = converse_response_to_chat(body.to_string().as_bytes(), MODEL, 1).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert!(v["choices"][0]["message"]["content"].is_null());
    }

    #[test]
    fn malformed_responses_are_errors() {
        for body in [&b"not json"[..], b"{}", br#"{"output":{"message":{}}}"#] {
            assert!(converse_response_to_chat(body, MODEL, 1).is_err());
        }
    }

    // ----- errors ------------------------------------------------------------

    #[test]
    fn error_table() {
        let coral = |t: &str| format!("{t}:http://internal.amazon.com/coral/com.amazon.bedrock/");
        // (bedrock status, x-amzn-errortype, body, caller status, type, code, message)
        #[allow(clippy::type_complexity)]
        let table: Vec<(u16, Option<String>, &str, u16, &str, Option<&str>, &str)> = vec![
            (
                429,
                Some(coral("ThrottlingException")),
                r#"{"message":"Too many requests, please wait before trying again."}"#,
                429,
                "rate_limit_error",
                Some("rate_limit_exceeded"),
                "Too many requests, please wait before trying again.",
            ),
            (
                400,
                Some(coral("ValidationException")),
                r#"{"message":"The model returned the following errors: max_tokens: 999999 > 8192"}"#,
                400,
                "invalid_request_error",
                None,
                "The model returned the following errors: max_tokens: 999999 > 8192",
            ),
            (
                403,
                Some(coral("AccessDeniedException")),
                r#"{"Message":"You don't have access to the model with the specified model ID."}"#,
                403,
                "permission_error",
                None,
                "You don't have access to the model with the specified model ID.",
            ),
            (
                404,
                Some("ResourceNotFoundException".into()),
                r#"{"message":"Model not found."}"#,
                404,
                "not_found_error",
                Some("model_not_found"),
                "Model not found.",
            ),
            (
                503,
                Some(coral("ServiceUnavailableException")),
                r#"{"message":"Bedrock is unable to process your request."}"#,
                503,
                "server_error",
                Some("service_unavailable"),
                "Bedrock is unable to process your request.",
            ),
            (
                429,
                Some(coral("ModelNotReadyException")),
                r#"{"message":"Model is not ready."}"#,
                503,
                "server_error",
                Some("model_not_ready"),
                "Model is not ready.",
            ),
            (
                408,
                Some(coral("ModelTimeoutException")),
                r#"{"message":"Model has timed out in processing the request."}"#,
                504,
                "server_error",
                Some("model_timeout"),
                "Model has timed out in processing the request.",
            ),
            (
                424,
                Some(coral("ModelErrorException")),
                r#"{"message":"The model failed.","originalStatusCode":500}"#,
                502,
                "server_error",
                Some("model_error"),
                "The model failed.",
            ),
            (
                400,
                Some(coral("ServiceQuotaExceededException")),
                r#"{"message":"Quota exceeded."}"#,
                429,
                "rate_limit_error",
                Some("quota_exceeded"),
                "Quota exceeded.",
            ),
            (
                403,
                Some("UnrecognizedClientException:http://internal.amazon.com/coral/com.amazon.coral.service/".into()),
                r#"{"message":"The security token included in the request is invalid."}"#,
                401,
                "authentication_error",
                Some("provider_authentication_failed"),
                "The security token included in the request is invalid.",
            ),
            (
                403,
                None,
                r#"{"__type":"com.amazon.coral.service#InvalidSignatureException","message":"Signature mismatch."}"#,
                401,
                "authentication_error",
                Some("provider_authentication_failed"),
                "Signature mismatch.",
            ),
            (
                500,
                Some(coral("InternalServerException")),
                r#"{"message":"Internal error."}"#,
                500,
                "server_error",
                None,
                "Internal error.",
            ),
            (
                502,
                None,
                "<html>Bad Gateway</html>",
                502,
                "server_error",
                None,
                "The Bedrock API returned HTTP 502: <html>Bad Gateway</html>",
            ),
            (
                408,
                None,
                "",
                504,
                "server_error",
                None,
                "The Bedrock API returned HTTP 408 with no details.",
            ),
            (
                418,
                Some("TeapotException".into()),
                r#"{"message":"short and stout"}"#,
                418,
                "invalid_request_error",
                None,
                "short and stout",
            ),
        ];
        for (status, error_type, body, caller, kind, code, message) in table {
            let et = error_type.as_deref();
            // caller_status sees the header only; a body's __type counts in
            // converse_error_to_chat alone.
            if !body.contains("__type") {
                assert_eq!(caller_status(status, et), caller, "{et:?}");
            }
            let out: Value =
                serde_json::from_slice(&converse_error_to_chat(status, et, body.as_bytes()))
                    .unwrap();
            assert_eq!(
                out,
                json!({"error": {"message": message, "type": kind, "param": null, "code": code}}),
                "{et:?}"
            );
        }
        // Long non-JSON bodies are cut at a character boundary.
        let long = "é".repeat(600);
        let out: Value =
            serde_json::from_slice(&converse_error_to_chat(500, None, long.as_bytes())).unwrap();
        assert!(out["error"]["message"].as_str().unwrap().len() < 600);
    }

    // ----- streaming ---------------------------------------------------------

    /// The fixture's events framed as ConverseStream sends them.
    fn frames(fixture: &str) -> Vec<Vec<u8>> {
        let events: Vec<(String, Value)> = serde_json::from_str(fixture).unwrap();
        events
            .iter()
            .map(|(kind, payload)| {
                encode(
                    &[
                        (":event-type", kind),
                        (":content-type", "application/json"),
                        (":message-type", "event"),
                    ],
                    payload.to_string().as_bytes(),
                )
            })
            .collect()
    }

    fn stream_bytes(fixture: &str) -> Vec<u8> {
        frames(fixture).concat()
    }

    fn exception_frame(kind: &str, message: &str) -> Vec<u8> {
        encode(
            &[
                (":exception-type", kind),
                (":content-type", "application/json"),
                (":message-type", "exception"),
            ],
            json!({ "message": message }).to_string().as_bytes(),
        )
    }

    fn run_pieces(pieces: &[&[u8]], include_usage: bool) -> Vec<u8> {
        let mut t = ConverseStreamToChat::new(include_usage, MODEL, CREATED);
        let mut out = Vec::new();
        for p in pieces {
            t.push(p, &mut out);
        }
        t.finish(&mut out);
        out
    }

    fn run(input: &[u8], include_usage: bool) -> Vec<u8> {
        run_pieces(&[input], include_usage)
    }

    /// The data payloads of an SSE output, checking the framing.
    fn data_events(out: &[u8]) -> Vec<String> {
        let text = std::str::from_utf8(out).unwrap();
        assert!(text.is_empty() || text.ends_with("\n\n"), "{text}");
        text.split_terminator("\n\n")
            .map(|e| e.strip_prefix("data: ").unwrap().to_string())
            .collect()
    }

    #[derive(Debug, Default)]
    struct Assembled {
        ids: Vec<String>,
        content: String,
        reasoning: String,
        /// index -> (id, name, arguments)
        tools: BTreeMap<u64, (String, String, String)>,
        finish_reasons: Vec<String>,
        usage_chunks: Vec<Value>,
        done_last: bool,
        errors: Vec<Value>,
    }

    fn assemble(out: &[u8], include_usage: bool) -> Assembled {
        let events = data_events(out);
        let mut a = Assembled {
            done_last: events.last().map(String::as_str) == Some("[DONE]"),
            ..Assembled::default()
        };
        assert!(events.iter().filter(|e| *e == "[DONE]").count() <= 1);
        for event in events.iter().filter(|e| *e != "[DONE]") {
            let v: Value = serde_json::from_str(event).unwrap();
            if v.get("error").is_some() {
                a.errors.push(v);
                continue;
            }
            assert_eq!(v["object"], "chat.completion.chunk");
            assert_eq!(v["created"], CREATED);
            assert_eq!(v["model"], MODEL);
            let id = v["id"].as_str().unwrap().to_string();
            assert!(id.starts_with("chatcmpl-"), "{id}");
            if !a.ids.contains(&id) {
                a.ids.push(id);
            }
            assert_eq!(v.get("usage").is_some(), include_usage, "{event}");
            let choices = v["choices"].as_array().unwrap();
            if choices.is_empty() {
                a.usage_chunks.push(v["usage"].clone());
                continue;
            }
            if include_usage {
                assert!(v["usage"].is_null(), "{event}");
            }
            let choice = &choices[0];
            assert_eq!(choice["index"], 0);
            assert!(choice["logprobs"].is_null());
            if let Some(f) = choice["finish_reason"].as_str() {
                a.finish_reasons.push(f.to_string());
            }
            let delta = &choice["delta"];
            if let Some(c) = delta["content"].as_str() {
                a.content.push_str(c);
            }
            if let Some(r) = delta["reasoning_content"].as_str() {
                a.reasoning.push_str(r);
            }
            for call in delta["tool_calls"].as_array().into_iter().flatten() {
                let index = call["index"].as_u64().unwrap();
                let entry = a.tools.entry(index).or_default();
                if let Some(id) = call["id"].as_str() {
                    assert!(entry.0.is_empty(), "id sent once");
                    entry.0 = id.to_string();
                    assert_eq!(call["type"], "function");
                }
                if let Some(name) = call["function"]["name"].as_str() {
                    entry.1.push_str(name);
                }
                entry
                    .2
                    .push_str(call["function"]["arguments"].as_str().unwrap());
            }
        }
        a
    }

    /// All at once, byte by byte, and split in two at every position.
    fn assert_chunking_invariant(input: &[u8], include_usage: bool) -> Vec<u8> {
        let whole = run(input, include_usage);
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(run_pieces(&bytes, include_usage), whole, "byte by byte");
        for at in 0..=input.len() {
            let (a, b) = input.split_at(at);
            assert_eq!(run_pieces(&[a, b], include_usage), whole, "split at {at}");
        }
        whole
    }

    #[test]
    fn text_stream_translates_identically_however_it_is_chunked() {
        let input = stream_bytes(TEXT_STREAM);
        for include_usage in [false, true] {
            let out = assert_chunking_invariant(&input, include_usage);
            let a = assemble(&out, include_usage);
            assert_eq!(a.ids.len(), 1, "one id for the whole stream");
            assert_eq!(
                a.content,
                "Hello, café ☕ — ça va? 👋\nSecond line with \"quotes\"."
            );
            assert_eq!(a.reasoning, "The user wants a greeting. Keep it short.");
            assert!(a.tools.is_empty());
            assert_eq!(a.finish_reasons, vec!["stop"]);
            assert!(a.errors.is_empty());
            assert!(a.done_last);
            if include_usage {
                assert_eq!(
                    a.usage_chunks,
                    vec![json!({"prompt_tokens": 125, "completion_tokens": 42,
                                "total_tokens": 167,
                                "prompt_tokens_details": {"cached_tokens": 100}})]
                );
            } else {
                assert!(a.usage_chunks.is_empty());
            }
            let first: Value = serde_json::from_str(&data_events(&out)[0]).unwrap();
            assert_eq!(
                first["choices"][0]["delta"],
                json!({"role": "assistant", "content": ""})
            );
        }
    }

    #[test]
    fn parallel_tool_stream_reassembles_by_openai_index() {
        let input = stream_bytes(TOOL_STREAM);
        for include_usage in [false, true] {
            let out = assert_chunking_invariant(&input, include_usage);
            let a = assemble(&out, include_usage);
            assert_eq!(a.content, "I'll look up the weather and the time in Paris.");
            // Indexes count tool calls from 0, not Converse's block indexes 1 and 2.
            assert_eq!(a.tools.keys().copied().collect::<Vec<_>>(), vec![0, 1]);
            let (id, name, args) = &a.tools[&0];
            assert_eq!(id, "tooluse_T1x1fJ34qAmk2tNTrN7Up6");
            assert_eq!(name, "get_weather");
            assert_eq!(
                serde_json::from_str::<Value>(args).unwrap(),
                json!({"location": "Paris, France", "unit": "celsius"})
            );
            let (id, name, args) = &a.tools[&1];
            assert_eq!(id, "tooluse_GsQd2bn9P1uSxRJ7N5gVpT");
            assert_eq!(name, "get_time");
            assert_eq!(
                serde_json::from_str::<Value>(args).unwrap(),
                json!({"timezone": "Europe/Paris"})
            );
            assert_eq!(a.finish_reasons, vec!["tool_calls"]);
            assert!(a.done_last);
            assert!(a.errors.is_empty());
            let expected_usage = if include_usage {
                vec![
                    json!({"prompt_tokens": 840, "completion_tokens": 89, "total_tokens": 929,
                            "prompt_tokens_details": {"cached_tokens": 0}}),
                ]
            } else {
                vec![]
            };
            assert_eq!(a.usage_chunks, expected_usage);
        }
    }

    /// tool_stream.bin was written by envoy/tools/eventstream.py from
    /// tool_stream.json (compact JSON, sorted keys, UTF-8 kept: the same bytes
    /// serde_json writes), so the Python mock encoder and this decoder agree:
    ///
    /// ```text
    /// python3 -c 'import json,sys; sys.path.insert(0,"envoy/tools"); import eventstream as e
    /// ev=json.load(open("tests/fixtures/bedrock/tool_stream.json"))
    /// sys.stdout.buffer.write(b"".join(e.event(k, json.dumps(p, separators=(",",":"),
    ///     sort_keys=True, ensure_ascii=False)) for k,p in ev))' > tests/fixtures/bedrock/tool_stream.bin
    /// ```
    #[test]
    fn python_encoded_fixture_matches() {
        let bin = include_bytes!("../../../tests/fixtures/bedrock/tool_stream.bin");
        let frames = frames(TOOL_STREAM);
        // eventstream.event() orders headers as :event-type, :content-type,
        // :message-type, like frames() here.
        assert_eq!(bin.len(), frames.iter().map(Vec::len).sum::<usize>());
        assert_eq!(&bin[..], &frames.concat()[..]);
        assert_eq!(run(bin, true), run(&frames.concat(), true));
    }

    #[test]
    fn usage_chunk_comes_right_before_done() {
        let out = run(&stream_bytes(TEXT_STREAM), true);
        let events = data_events(&out);
        let n = events.len();
        assert_eq!(events[n - 1], "[DONE]");
        let last_chunk: Value = serde_json::from_str(&events[n - 2]).unwrap();
        assert_eq!(last_chunk["choices"], json!([]));
        assert_eq!(last_chunk["usage"]["total_tokens"], 167);
        let finish: Value = serde_json::from_str(&events[n - 3]).unwrap();
        assert_eq!(finish["choices"][0]["finish_reason"], "stop");
        assert_eq!(finish["choices"][0]["delta"], json!({}));
    }

    #[test]
    fn usage_is_reported_to_the_filter() {
        let mut t = ConverseStreamToChat::new(false, MODEL, CREATED);
        assert_eq!(t.usage(), None);
        let mut out = Vec::new();
        t.push(&stream_bytes(TOOL_STREAM), &mut out);
        assert_eq!(
            t.usage(),
            Some(Usage {
                input_tokens: 840,
                output_tokens: 89,
                cached_input_tokens: 0,
                reasoning_tokens: 0
            })
        );
        let mut t = ConverseStreamToChat::new(true, MODEL, CREATED);
        t.push(&stream_bytes(TEXT_STREAM), &mut out);
        assert_eq!(
            t.usage(),
            Some(Usage {
                input_tokens: 125,
                output_tokens: 42,
                cached_input_tokens: 100,
                reasoning_tokens: 0
            })
        );
    }

    /// Output appears as soon as the frame producing it completes; several
    /// frames in one chunk give the same output as one frame per chunk.
    #[test]
    fn nothing_is_held_back() {
        for fixture in [TEXT_STREAM, TOOL_STREAM] {
            let full = run(&stream_bytes(fixture), true);
            let events: Vec<(String, Value)> = serde_json::from_str(fixture).unwrap();
            let mut t = ConverseStreamToChat::new(true, MODEL, CREATED);
            let mut out = Vec::new();
            for (frame, (kind, payload)) in frames(fixture).iter().zip(&events) {
                let before = out.len();
                let (body, end) = frame.split_at(frame.len() - 1);
                t.push(body, &mut out);
                assert_eq!(out.len(), before, "output before the frame ended: {kind}");
                t.push(end, &mut out);
                let silent = kind == "contentBlockStop"
                    || payload
                        .pointer("/delta/reasoningContent/signature")
                        .is_some();
                assert_eq!(out.len() == before, silent, "{kind} {payload}");
                assert!(full.starts_with(&out));
            }
            assert_eq!(out, full);
            // Three frames per chunk.
            let grouped: Vec<Vec<u8>> = frames(fixture).chunks(3).map(|c| c.concat()).collect();
            let pieces: Vec<&[u8]> = grouped.iter().map(Vec::as_slice).collect();
            assert_eq!(run_pieces(&pieces, true), full);
        }
    }

    #[test]
    fn exception_frame_ends_the_stream_without_done() {
        let f = frames(TEXT_STREAM);
        let mut input = f[..3].concat();
        input.extend(exception_frame(
            "throttlingException",
            "Too many tokens, slow down.",
        ));
        input.extend(f[5..].concat());
        let mut t = ConverseStreamToChat::new(true, MODEL, CREATED);
        let mut out = Vec::new();
        t.push(&input, &mut out);
        let events = data_events(&out);
        assert!(!events.iter().any(|e| e == "[DONE]"));
        let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
        assert_eq!(
            last,
            json!({"error": {"message": "Too many tokens, slow down.", "type": "rate_limit_error",
                             "param": null, "code": "rate_limit_exceeded"}})
        );
        let a = assemble(&out, true);
        assert_eq!(a.reasoning, "The user wants a greeting. Keep it short.");
        assert!(a.content.is_empty());
        let len = out.len();
        t.finish(&mut out);
        t.push(&f[8], &mut out);
        assert_eq!(out.len(), len, "nothing after an error");

        // Other exception types, and the generic error message type.
        let cases: Vec<(Vec<u8>, &str, Option<&str>)> = vec![
            (
                exception_frame("modelStreamErrorException", "boom"),
                "server_error",
                Some("model_error"),
            ),
            (
                exception_frame("internalServerException", "oops"),
                "server_error",
                None,
            ),
            (
                exception_frame("validationException", "bad input"),
                "invalid_request_error",
                None,
            ),
            (
                exception_frame("serviceUnavailableException", "later"),
                "server_error",
                Some("service_unavailable"),
            ),
            (
                encode(
                    &[
                        (":message-type", "error"),
                        (":error-code", "InternalFailure"),
                        (":error-message", "Something broke"),
                    ],
                    b"",
                ),
                "server_error",
                None,
            ),
        ];
        for (frame, kind, code) in cases {
            let mut input = f[0].clone();
            input.extend(frame);
            let out = run(&input, false);
            let events = data_events(&out);
            assert_eq!(events.len(), 2, "role chunk, then the error only");
            let last: Value = serde_json::from_str(&events[1]).unwrap();
            assert_eq!(last["error"]["type"], kind);
            assert_eq!(last["error"]["code"], json!(code));
            assert!(!last["error"]["message"].as_str().unwrap().is_empty());
        }
    }

    #[test]
    fn truncated_stream_ends_with_an_interruption_error() {
        let f = frames(TOOL_STREAM);
        let input = f.concat();
        let metadata_len = f.last().unwrap().len();
        let cuts = [
            input.len() / 2,
            // Everything but metadata: the finish_reason came, yet not the end.
            input.len() - metadata_len,
            // Inside the final frame.
            input.len() - 3,
            0,
        ];
        for cut in cuts {
            for include_usage in [false, true] {
                let out = run(&input[..cut], include_usage);
                let events = data_events(&out);
                assert!(!events.iter().any(|e| e == "[DONE]"), "cut {cut}");
                let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
                let error = &last["error"];
                assert_eq!(error["type"], "server_error");
                assert_eq!(error["code"], "stream_interrupted");
                assert!(error["param"].is_null());
                assert!(error["message"]
                    .as_str()
                    .unwrap()
                    .contains("ended before completion"));
                assert!(assemble(&out, include_usage).usage_chunks.is_empty());
            }
        }
        // metadata without messageStop is not an end either.
        let mut no_stop = f.clone();
        no_stop.remove(no_stop.len() - 2);
        let out = run(&no_stop.concat(), true);
        assert!(!out.ends_with(b"data: [DONE]\n\n"));
        assert!(String::from_utf8(out)
            .unwrap()
            .contains("stream_interrupted"));
    }

    #[test]
    fn corrupt_frame_ends_the_stream_with_an_error() {
        let f = frames(TEXT_STREAM);
        let mut input = f[..2].concat();
        let mut bad = f[2].clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x01;
        input.extend(bad);
        input.extend(f[3..].concat());
        let mut t = ConverseStreamToChat::new(false, MODEL, CREATED);
        let mut out = Vec::new();
        t.push(&input, &mut out);
        let events = data_events(&out);
        assert_eq!(events.len(), 3, "role, first reasoning delta, error");
        let last: Value = serde_json::from_str(&events[2]).unwrap();
        assert_eq!(last["error"]["code"], "invalid_provider_response");
        assert!(last["error"]["message"]
            .as_str()
            .unwrap()
            .contains("could not read"));
        let len = out.len();
        t.finish(&mut out);
        assert_eq!(out.len(), len);
    }

    #[test]
    fn finish_is_idempotent_and_silent_after_a_complete_stream() {
        let input = stream_bytes(TEXT_STREAM);
        let mut t = ConverseStreamToChat::new(false, MODEL, CREATED);
        let mut out = Vec::new();
        t.push(&input, &mut out);
        let len = out.len();
        assert!(out.ends_with(b"data: [DONE]\n\n"));
        t.finish(&mut out);
        t.push(&input, &mut out);
        assert_eq!(out.len(), len);

        let mut t = ConverseStreamToChat::new(false, MODEL, CREATED);
        let mut out = Vec::new();
        t.push(&input[..100], &mut out);
        t.finish(&mut out);
        let len = out.len();
        assert!(len > 0);
        t.finish(&mut out);
        t.push(&input[100..], &mut out);
        assert_eq!(out.len(), len, "nothing after the interruption error");
    }

    #[test]
    fn unknown_events_are_ignored() {
        let plain = run(&stream_bytes(TEXT_STREAM), false);
        let f = frames(TEXT_STREAM);
        let mut noisy = f[0].clone();
        noisy.extend(encode(
            &[(":event-type", "futureEvent"), (":message-type", "event")],
            br#"{"x":1}"#,
        ));
        noisy.extend(encode(
            &[
                (":event-type", "contentBlockDelta"),
                (":message-type", "event"),
            ],
            br#"{"contentBlockIndex":7,"delta":{"toolUse":{"input":"{}"}}}"#,
        ));
        noisy.extend(f[1..].concat());
        assert_eq!(run(&noisy, false), plain);
    }
}
