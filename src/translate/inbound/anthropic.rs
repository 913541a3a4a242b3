//! Anthropic Messages API callers (`POST /v1/messages`) reaching providers
//! through the OpenAI Chat Completions pivot.
//!
//! * [`messages_request_to_chat`]: the caller's request body, rewritten for
//!   `POST /v1/chat/completions`.
//! * [`chat_response_to_messages`], [`chat_error_to_messages`],
//!   [`error_body`]: a non-streamed answer or an error in Anthropic's shapes.
//! * [`ChatStreamToMessages`]: `chat.completion.chunk` events translated into
//!   Anthropic's stream events, one upstream event at a time.
//!
//! Decisions worth knowing:
//! * `max_tokens` is sent as OpenAI's `max_tokens`, which every
//!   OpenAI-compatible server understands (vLLM, Ollama, Mistral, DeepSeek,
//!   Groq...), except when thinking is requested: reasoning models reject
//!   `max_tokens` and want `max_completion_tokens`, which like Anthropic's
//!   `max_tokens` counts the thinking tokens too.
//! * `thinking.budget_tokens` becomes `reasoning_effort`: below
//!   [`EFFORT_MEDIUM_FROM`] `low`, below [`EFFORT_HIGH_FROM`] `medium`, else
//!   `high` (the inverse of the budgets `outbound::anthropic` picks per effort).
//! * Caller parameters OpenAI cannot honour (`top_k`, server tools, document
//!   blocks, MCP servers...) are a 400 `unsupported_parameter`; only hints
//!   without effect on the answer (`cache_control`, `service_tier`) are
//!   dropped.
//! * Thinking blocks in the assistant history are dropped: their signatures
//!   only mean something to Anthropic. Answers' `reasoning_content` becomes
//!   thinking blocks with an empty signature (the SDK only needs a string).
//! * Tool call arguments that are not a JSON object become `input: {}` with a
//!   warning in the log (Anthropic's `input` must be an object; a broken call
//!   then fails visibly in the caller's tool code rather than here).

use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::core::api_error::ApiError;
use crate::core::json::{from_slice_lossy, from_str_lossy};
use crate::core::sse::{SseEvent, SseParser};
use crate::core::usage::Usage;
use crate::translate::chat_input::{invalid_value, json_type, quoted, unsupported};
use crate::translate::inbound::CallerTranslator;
use crate::translate::stream::{EventMapping, EventStream, Flow};
use crate::translate::{StreamFault, StreamTranslator};

/// Thinking budgets from this many tokens ask for `reasoning_effort: "medium"`.
pub const EFFORT_MEDIUM_FROM: u64 = 4096;
/// Thinking budgets from this many tokens ask for `reasoning_effort: "high"`.
pub const EFFORT_HIGH_FROM: u64 = 16384;

/// What the filter needs to know about a translated request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessagesRequestInfo {
    pub stream: bool,
}

// ---------------------------------------------------------------------------
// Request: Anthropic messages -> OpenAI chat completions
// ---------------------------------------------------------------------------

fn invalid_type(param: &'static str, want: &str, got: &Value) -> ApiError {
    ApiError::invalid_request(
        Some("invalid_type"),
        format!("{param}: Input should be {want}, not {}.", json_type(got)),
    )
    .with_param(param)
}

fn missing(param: &'static str) -> ApiError {
    ApiError::invalid_request(
        Some("missing_required_parameter"),
        format!("{param}: Field required"),
    )
    .with_param(param)
}

fn bad_message(message: String) -> ApiError {
    invalid_value("messages", message)
}

fn str_field<'a>(v: &'a Value, name: &str) -> Option<&'a str> {
    v.get(name).and_then(Value::as_str)
}

fn text_part(text: &str) -> Value {
    json!({"type": "text", "text": text})
}

/// An Anthropic image block -> an OpenAI `image_url` content part.
fn image_part(block: &Value, at: &str) -> Result<Value, ApiError> {
    let Some(source) = block.get("source").filter(|s| s.is_object()) else {
        return Err(bad_message(format!("{at}.source: Field required")));
    };
    let url = match str_field(source, "type") {
        Some("base64") => {
            let media_type = str_field(source, "media_type")
                .ok_or_else(|| bad_message(format!("{at}.source.media_type: Field required")))?;
            let data = str_field(source, "data")
                .ok_or_else(|| bad_message(format!("{at}.source.data: Field required")))?;
            format!("data:{media_type};base64,{data}")
        }
        Some("url") => str_field(source, "url")
            .ok_or_else(|| bad_message(format!("{at}.source.url: Field required")))?
            .to_string(),
        Some(other) => {
            return Err(unsupported(
                "messages",
                format!(
                    "{at}.source: image sources of type '{other}' are not supported by this \
                     provider through this gateway; send the image as base64 or as a URL."
                ),
            ))
        }
        None => return Err(bad_message(format!("{at}.source.type: Field required"))),
    };
    Ok(json!({"type": "image_url", "image_url": {"url": url}}))
}

/// An Anthropic `tool_result` block -> an OpenAI `tool` message.
fn tool_message(block: &Value, at: &str) -> Result<Value, ApiError> {
    let id = str_field(block, "tool_use_id")
        .ok_or_else(|| bad_message(format!("{at}.tool_use_id: Field required")))?;
    let text = match block.get("content").unwrap_or(&Value::Null) {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Array(parts) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (k, part) in parts.iter().enumerate() {
                match str_field(part, "type") {
                    Some("text") => texts.push(str_field(part, "text").ok_or_else(|| {
                        bad_message(format!("{at}.content.{k}.text: Field required"))
                    })?),
                    Some(kind) => {
                        return Err(unsupported(
                            "messages",
                            format!(
                                "{at}.content.{k}: tool results with '{kind}' blocks are not \
                                 supported by this provider through this gateway (OpenAI tool \
                                 messages carry text only)."
                            ),
                        ))
                    }
                    None => {
                        return Err(bad_message(format!(
                            "{at}.content.{k}.type: Field required"
                        )))
                    }
                }
            }
            texts.join("\n")
        }
        other => {
            return Err(bad_message(format!(
                "{at}.content: Input should be a string or an array of blocks, not {}.",
                json_type(other)
            )))
        }
    };
    // OpenAI has no error flag on tool messages: say it in the content.
    let content = match block.get("is_error").and_then(Value::as_bool) {
        Some(true) if text.is_empty() => "Error".to_string(),
        Some(true) => format!("Error: {text}"),
        _ => text,
    };
    Ok(json!({"role": "tool", "tool_call_id": id, "content": content}))
}

fn unsupported_block(at: &str, kind: &str) -> ApiError {
    let hint = if kind == "document" {
        " Extract the document's text and send it as a text block."
    } else {
        ""
    };
    unsupported(
        "messages",
        format!(
            "{at}: content blocks of type '{kind}' are not supported by this provider through \
             this gateway.{hint}"
        ),
    )
}

/// A user turn: its tool results (as `tool` messages, first, as OpenAI wants
/// them right after the assistant's calls) and then its other content.
fn user_messages(content: &Value, i: usize, out: &mut Vec<Value>) -> Result<(), ApiError> {
    let blocks = match content {
        Value::String(s) => {
            out.push(json!({"role": "user", "content": s}));
            return Ok(());
        }
        Value::Array(blocks) if !blocks.is_empty() => blocks,
        Value::Array(_) => {
            return Err(bad_message(format!(
                "messages.{i}: all messages must have non-empty content"
            )))
        }
        other => {
            return Err(bad_message(format!(
                "messages.{i}.content: Input should be a string or an array of blocks, not {}.",
                json_type(other)
            )))
        }
    };
    let mut parts = Vec::new();
    for (j, block) in blocks.iter().enumerate() {
        let at = format!("messages.{i}.content.{j}");
        match str_field(block, "type") {
            Some("text") => {
                let text = str_field(block, "text")
                    .ok_or_else(|| bad_message(format!("{at}.text: Field required")))?;
                parts.push(text_part(text));
            }
            Some("image") => parts.push(image_part(block, &at)?),
            Some("tool_result") => out.push(tool_message(block, &at)?),
            Some(kind) => return Err(unsupported_block(&at, kind)),
            None => return Err(bad_message(format!("{at}.type: Field required"))),
        }
    }
    match parts.as_slice() {
        [] => {}
        // One text block is the plain string every compatible server takes.
        [only] if only.get("type").and_then(Value::as_str) == Some("text") => {
            let text = only.get("text").cloned().unwrap_or_default();
            out.push(json!({"role": "user", "content": text}));
        }
        _ => out.push(json!({"role": "user", "content": parts})),
    }
    Ok(())
}

fn tool_call(block: &Value, at: &str) -> Result<Value, ApiError> {
    let id =
        str_field(block, "id").ok_or_else(|| bad_message(format!("{at}.id: Field required")))?;
    let name = str_field(block, "name")
        .ok_or_else(|| bad_message(format!("{at}.name: Field required")))?;
    let arguments = match block.get("input") {
        None | Some(Value::Null) => "{}".to_string(),
        Some(input @ Value::Object(_)) => input.to_string(),
        Some(other) => {
            return Err(bad_message(format!(
                "{at}.input: Input should be an object, not {}.",
                json_type(other)
            )))
        }
    };
    Ok(json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}))
}

/// An assistant turn, or nothing when it only held thinking.
fn assistant_message(content: &Value, i: usize) -> Result<Option<Value>, ApiError> {
    let blocks = match content {
        Value::String(s) => return Ok(Some(json!({"role": "assistant", "content": s}))),
        Value::Array(blocks) => blocks,
        other => {
            return Err(bad_message(format!(
                "messages.{i}.content: Input should be a string or an array of blocks, not {}.",
                json_type(other)
            )))
        }
    };
    let mut text: Option<String> = None;
    let mut calls = Vec::new();
    for (j, block) in blocks.iter().enumerate() {
        let at = format!("messages.{i}.content.{j}");
        match str_field(block, "type") {
            Some("text") => {
                let t = str_field(block, "text")
                    .ok_or_else(|| bad_message(format!("{at}.text: Field required")))?;
                text.get_or_insert_with(String::new).push_str(t);
            }
            Some("tool_use") => calls.push(tool_call(block, &at)?),
            // Signed by and for Anthropic; an OpenAI model cannot use them.
            Some("thinking" | "redacted_thinking") => {}
            Some(kind) => return Err(unsupported_block(&at, kind)),
            None => return Err(bad_message(format!("{at}.type: Field required"))),
        }
    }
    if text.is_none() && calls.is_empty() {
        return Ok(None);
    }
    let mut msg = Map::new();
    msg.insert("role".into(), Value::String("assistant".into()));
    msg.insert("content".into(), text.map_or(Value::Null, Value::String));
    if !calls.is_empty() {
        msg.insert("tool_calls".into(), Value::Array(calls));
    }
    Ok(Some(Value::Object(msg)))
}

fn system_message(system: &Value) -> Result<Option<Value>, ApiError> {
    let text = match system {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => {
            let mut texts = Vec::with_capacity(blocks.len());
            for (j, block) in blocks.iter().enumerate() {
                if str_field(block, "type") != Some("text") {
                    return Err(invalid_value(
                        "system",
                        format!("system.{j}: system blocks must be of type 'text'."),
                    ));
                }
                let t = str_field(block, "text").ok_or_else(|| {
                    invalid_value("system", format!("system.{j}.text: Field required"))
                })?;
                texts.push(t);
            }
            texts.join("\n\n")
        }
        other => {
            return Err(invalid_type(
                "system",
                "a string or an array of text blocks",
                other,
            ))
        }
    };
    Ok((!text.is_empty()).then(|| json!({"role": "system", "content": text})))
}

fn convert_messages(messages: &[Value], out: &mut Vec<Value>) -> Result<(), ApiError> {
    if messages.is_empty() {
        return Err(bad_message(
            "messages: at least one message is required".into(),
        ));
    }
    for (i, msg) in messages.iter().enumerate() {
        if !msg.is_object() {
            return Err(bad_message(format!(
                "messages.{i}: Input should be an object, not {}.",
                json_type(msg)
            )));
        }
        let content = msg
            .get("content")
            .ok_or_else(|| bad_message(format!("messages.{i}.content: Field required")))?;
        match str_field(msg, "role") {
            Some("user") => user_messages(content, i, out)?,
            Some("assistant") => {
                if let Some(m) = assistant_message(content, i)? {
                    out.push(m);
                }
            }
            Some(other) => {
                return Err(bad_message(format!(
                    "messages.{i}.role: Input should be 'user' or 'assistant', not '{other}'."
                )))
            }
            None => return Err(bad_message(format!("messages.{i}.role: Field required"))),
        }
    }
    Ok(())
}

fn convert_tool(tool: &Value, i: usize) -> Result<Value, ApiError> {
    let bad = |what: String| invalid_value("tools", format!("tools.{i}{what}"));
    if !tool.is_object() {
        return Err(bad(": Input should be an object.".into()));
    }
    match str_field(tool, "type") {
        None | Some("custom") => {}
        Some(kind) => {
            return Err(unsupported(
                "tools",
                format!(
                    "tools.{i}: the server tool '{kind}' is not supported by this provider \
                     through this gateway; define a custom tool with an input_schema instead."
                ),
            ))
        }
    }
    let name = str_field(tool, "name").ok_or_else(|| bad(".name: Field required".into()))?;
    let mut function = Map::new();
    function.insert("name".into(), Value::String(name.to_string()));
    match tool.get("description") {
        None | Some(Value::Null) => {}
        Some(d @ Value::String(_)) => {
            function.insert("description".into(), d.clone());
        }
        Some(_) => return Err(bad(".description: Input should be a string.".into())),
    }
    match tool.get("input_schema") {
        Some(schema @ Value::Object(_)) => {
            function.insert("parameters".into(), schema.clone());
        }
        None | Some(Value::Null) => return Err(bad(".input_schema: Field required".into())),
        Some(_) => return Err(bad(".input_schema: Input should be an object.".into())),
    }
    if let Some(strict @ Value::Bool(_)) = tool.get("strict") {
        function.insert("strict".into(), strict.clone());
    }
    Ok(json!({"type": "function", "function": function}))
}

/// `tool_choice` -> OpenAI's `tool_choice`, and whether parallel calls are off.
fn convert_tool_choice(choice: &Value) -> Result<(Value, bool), ApiError> {
    if !choice.is_object() {
        return Err(invalid_type("tool_choice", "an object", choice));
    }
    let no_parallel = match choice.get("disable_parallel_tool_use") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(invalid_type(
                "tool_choice",
                "a boolean in 'disable_parallel_tool_use'",
                other,
            ))
        }
    };
    let out = match str_field(choice, "type") {
        Some("auto") => json!("auto"),
        Some("any") => json!("required"),
        Some("none") => json!("none"),
        Some("tool") => {
            let name = str_field(choice, "name").ok_or_else(|| {
                invalid_value("tool_choice", "tool_choice.name: Field required".into())
            })?;
            json!({"type": "function", "function": {"name": name}})
        }
        _ => {
            return Err(invalid_value(
                "tool_choice",
                "tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'.".into(),
            ))
        }
    };
    Ok((out, no_parallel))
}

/// `thinking` -> OpenAI's `reasoning_effort`, if thinking is on.
fn reasoning_effort(thinking: &Value) -> Result<Option<&'static str>, ApiError> {
    match str_field(thinking, "type") {
        Some("disabled") => Ok(None),
        Some("enabled") => {
            let budget = thinking.get("budget_tokens");
            let Some(budget) = budget.and_then(Value::as_u64) else {
                return Err(match budget {
                    None | Some(Value::Null) => {
                        invalid_value("thinking", "thinking.budget_tokens: Field required".into())
                    }
                    Some(other) => invalid_type("thinking", "a positive integer", other),
                });
            };
            Ok(Some(if budget < EFFORT_MEDIUM_FROM {
                "low"
            } else if budget < EFFORT_HIGH_FROM {
                "medium"
            } else {
                "high"
            }))
        }
        _ => Err(invalid_value(
            "thinking",
            "thinking.type: Input should be 'enabled' or 'disabled'.".into(),
        )),
    }
}

#[derive(Serialize)]
struct ChatRequest<'a> {
    model: &'a str,
    messages: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_completion_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_effort: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<&'a Value>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    stop: Vec<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parallel_tool_calls: Option<bool>,
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<Value>,
}

/// Anthropic Messages request body -> OpenAI chat completions request body
/// with `model` set to `upstream_model`. When streaming, always asks for
/// `stream_options: {"include_usage": true}`.
pub fn messages_request_to_chat(
    body: &[u8],
    upstream_model: &str,
) -> Result<(Vec<u8>, MessagesRequestInfo), ApiError> {
    let req = crate::translate::request_object(body)?;
    let field = |name: &str| req.get(name).filter(|v| !v.is_null());

    if field("top_k").is_some() {
        return Err(unsupported(
            "top_k",
            "top_k is not supported by this provider through this gateway (OpenAI has no \
             top-k sampling); remove it or use top_p."
                .into(),
        ));
    }
    for name in ["container", "context_management", "output_format"] {
        if field(name).is_some() {
            return Err(unsupported(
                name,
                format!("{name} is not supported by this provider through this gateway."),
            ));
        }
    }
    if field("mcp_servers")
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty())
    {
        return Err(unsupported(
            "mcp_servers",
            "mcp_servers is not supported by this provider through this gateway.".into(),
        ));
    }

    let max_tokens = match field("max_tokens") {
        None => return Err(missing("max_tokens")),
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 => n,
            _ => return Err(invalid_type("max_tokens", "a positive integer", v)),
        },
    };

    let mut messages = Vec::new();
    if let Some(system) = field("system") {
        messages.extend(system_message(system)?);
    }
    match field("messages") {
        None => return Err(missing("messages")),
        Some(Value::Array(m)) => convert_messages(m, &mut messages)?,
        Some(other) => return Err(invalid_type("messages", "an array", other)),
    }

    let number = |name: &'static str| -> Result<Option<&Value>, ApiError> {
        match field(name) {
            None => Ok(None),
            Some(v @ Value::Number(_)) => Ok(Some(v)),
            Some(other) => Err(invalid_type(name, "a number", other)),
        }
    };
    let temperature = number("temperature")?;
    let top_p = number("top_p")?;

    let stop = match field("stop_sequences") {
        None => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|s| {
                s.as_str()
                    .ok_or_else(|| invalid_type("stop_sequences", "an array of strings", s))
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(other) => return Err(invalid_type("stop_sequences", "an array of strings", other)),
    };

    let stream = match field("stream") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => return Err(invalid_type("stream", "a boolean", other)),
    };

    let user = match field("metadata") {
        None => None,
        Some(m @ Value::Object(_)) => match m.get("user_id") {
            None | Some(Value::Null) => None,
            Some(Value::String(u)) => Some(u.as_str()),
            Some(other) => return Err(invalid_type("metadata", "a string in 'user_id'", other)),
        },
        Some(other) => return Err(invalid_type("metadata", "an object", other)),
    };

    let tools = match field("tools") {
        None => Vec::new(),
        Some(Value::Array(tools)) => tools
            .iter()
            .enumerate()
            .map(|(i, t)| convert_tool(t, i))
            .collect::<Result<Vec<_>, _>>()?,
        Some(other) => return Err(invalid_type("tools", "an array", other)),
    };
    let (mut tool_choice, no_parallel) = match field("tool_choice") {
        None => (None, false),
        Some(c) => {
            let (choice, no_parallel) = convert_tool_choice(c)?;
            (Some(choice), no_parallel)
        }
    };
    let mut parallel_tool_calls = None;
    if tools.is_empty() {
        if tool_choice.as_ref().is_some_and(Value::is_object)
            || tool_choice.as_ref().and_then(Value::as_str) == Some("required")
        {
            return Err(invalid_value(
                "tool_choice",
                "tool_choice requires a tool, but 'tools' is empty.".into(),
            ));
        }
        // auto or none without tools: no tool use either way.
        tool_choice = None;
    } else if no_parallel {
        // OpenAI only accepts parallel_tool_calls alongside tools.
        parallel_tool_calls = Some(false);
    }

    let effort = match field("thinking") {
        None => None,
        Some(t) => reasoning_effort(t)?,
    };
    // See the module documentation: max_completion_tokens only for reasoning.
    let (max_tokens, max_completion_tokens) = match effort {
        Some(_) => (None, Some(max_tokens)),
        None => (Some(max_tokens), None),
    };

    let out = ChatRequest {
        model: upstream_model,
        messages,
        max_tokens,
        max_completion_tokens,
        reasoning_effort: effort,
        temperature,
        top_p,
        stop,
        user,
        tools,
        tool_choice,
        parallel_tool_calls,
        stream,
        stream_options: stream.then(|| json!({"include_usage": true})),
    };
    let body = serde_json::to_vec(&out).map_err(|e| {
        ApiError::new(
            500,
            "server_error",
            Some("gateway_error"),
            format!("Gateway error: could not serialize the OpenAI request: {e}."),
        )
    })?;
    Ok((body, MessagesRequestInfo { stream }))
}

// ---------------------------------------------------------------------------
// Responses: OpenAI -> Anthropic
// ---------------------------------------------------------------------------

/// OpenAI's usage fields as reported.
#[derive(Debug, Clone, Copy, Default)]
struct RawUsage {
    prompt: u64,
    completion: u64,
    cached: u64,
    reasoning: u64,
}

impl RawUsage {
    fn from_value(usage: &Value) -> Self {
        let read = |p: &str| usage.pointer(p).and_then(Value::as_u64).unwrap_or(0);
        RawUsage {
            prompt: read("/prompt_tokens"),
            completion: read("/completion_tokens"),
            cached: read("/prompt_tokens_details/cached_tokens"),
            reasoning: read("/completion_tokens_details/reasoning_tokens"),
        }
    }

    fn usage(&self) -> Usage {
        Usage {
            input_tokens: self.prompt,
            output_tokens: self.completion,
            cached_input_tokens: self.cached,
            reasoning_tokens: self.reasoning,
        }
    }

    fn anthropic(&self) -> MessageUsage {
        MessageUsage {
            // Anthropic's input_tokens leaves out the tokens read from cache.
            input_tokens: self.prompt.saturating_sub(self.cached),
            // OpenAI caches automatically and does not bill or report writes.
            cache_creation_input_tokens: 0,
            cache_read_input_tokens: self.cached,
            output_tokens: self.completion,
        }
    }
}

#[derive(Serialize)]
struct MessageUsage {
    input_tokens: u64,
    cache_creation_input_tokens: u64,
    cache_read_input_tokens: u64,
    output_tokens: u64,
}

/// A content block as Anthropic sends it (also the empty block a stream's
/// `content_block_start` announces).
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block<'a> {
    Thinking {
        thinking: &'a str,
        signature: &'a str,
    },
    Text {
        text: &'a str,
    },
    ToolUse {
        id: &'a str,
        name: &'a str,
        input: Value,
    },
}

#[derive(Serialize)]
struct MessageOut<'a> {
    id: String,
    #[serde(rename = "type")]
    kind: &'static str,
    role: &'static str,
    model: &'a str,
    content: Vec<Block<'a>>,
    stop_reason: &'static str,
    /// OpenAI does not say which stop sequence matched.
    stop_sequence: (),
    usage: MessageUsage,
}

/// Anthropic message ids start with `msg_`.
fn message_id(openai_id: &str) -> String {
    if openai_id.starts_with("msg_") {
        openai_id.to_string()
    } else if openai_id.is_empty() {
        "msg_gateway".to_string()
    } else {
        format!("msg_{openai_id}")
    }
}

/// OpenAI `finish_reason` -> Anthropic `stop_reason`. Some compatible
/// servers say `stop` after tool calls; Anthropic callers loop on
/// `tool_use`, so tool calls win.
fn stop_reason(finish: Option<&str>, has_tool_calls: bool, refused: bool) -> &'static str {
    match finish {
        Some("length") => "max_tokens",
        Some("tool_calls" | "function_call") => "tool_use",
        Some("content_filter") => "refusal",
        _ if has_tool_calls => "tool_use",
        _ if refused => "refusal",
        // stop (a stop sequence included: OpenAI does not tell them apart).
        _ => "end_turn",
    }
}

/// Tool call arguments -> Anthropic's `input` object (see the module docs).
fn tool_input(arguments: Option<&Value>, call: &str) -> Value {
    let parsed = match arguments {
        None | Some(Value::Null) => return Value::Object(Map::new()),
        Some(Value::String(s)) if s.trim().is_empty() => return Value::Object(Map::new()),
        Some(Value::String(s)) => from_str_lossy::<Value>(s).ok(),
        Some(other) => Some(other.clone()),
    };
    match parsed {
        Some(v @ Value::Object(_)) => v,
        _ => {
            log::warn!("tool call {call:?}: arguments are not a JSON object; sending input {{}}");
            Value::Object(Map::new())
        }
    }
}

/// The text of a reasoning field: `reasoning_content` (DeepSeek, vLLM) or
/// `reasoning` (OpenRouter, newer vLLM).
fn reasoning_text(v: &Value) -> Option<&str> {
    str_field(v, "reasoning_content").or_else(|| str_field(v, "reasoning"))
}

/// OpenAI chat.completion body -> Anthropic Message body.
pub fn chat_response_to_messages(openai_body: &[u8]) -> Result<Vec<u8>, String> {
    let v: Value = from_slice_lossy(openai_body)
        .map_err(|e| format!("the OpenAI response is not valid JSON: {e}"))?;
    let choice = v
        .get("choices")
        .and_then(Value::as_array)
        .and_then(|c| c.first())
        .ok_or("the OpenAI response has no choices")?;
    let empty = Value::Object(Map::new());
    let message = choice.get("message").unwrap_or(&empty);
    let mut content = Vec::new();
    if let Some(thinking) = reasoning_text(message).filter(|t| !t.is_empty()) {
        content.push(Block::Thinking {
            thinking,
            signature: "",
        });
    }
    if let Some(text) = str_field(message, "content").filter(|t| !t.is_empty()) {
        content.push(Block::Text { text });
    }
    let refusal = str_field(message, "refusal").filter(|t| !t.is_empty());
    if let Some(text) = refusal {
        content.push(Block::Text { text });
    }
    let calls = message.get("tool_calls").and_then(Value::as_array);
    for call in calls.into_iter().flatten() {
        let id = str_field(call, "id").unwrap_or_default();
        let function = call.get("function").unwrap_or(&empty);
        content.push(Block::ToolUse {
            id,
            name: str_field(function, "name").unwrap_or_default(),
            input: tool_input(function.get("arguments"), id),
        });
    }
    let has_calls = calls.is_some_and(|c| !c.is_empty());
    let usage = v
        .get("usage")
        .filter(|u| u.is_object())
        .map(RawUsage::from_value)
        .unwrap_or_default();
    let out = MessageOut {
        id: message_id(str_field(&v, "id").unwrap_or_default()),
        kind: "message",
        role: "assistant",
        model: str_field(&v, "model").unwrap_or_default(),
        content,
        stop_reason: stop_reason(
            str_field(choice, "finish_reason"),
            has_calls,
            refusal.is_some(),
        ),
        stop_sequence: (),
        usage: usage.anthropic(),
    };
    serde_json::to_vec(&out).map_err(|e| format!("could not serialize the answer: {e}"))
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// The Anthropic error `type` for an HTTP status.
fn error_type_for_status(status: u16) -> &'static str {
    match status {
        400 | 422 => "invalid_request_error",
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        504 => "timeout_error",
        _ => "api_error",
    }
}

/// An OpenAI error's `type` and `code` -> the closest Anthropic type, for
/// errors without a status (stream error events).
fn error_type_for_openai(kind: Option<&str>, code: Option<&str>) -> &'static str {
    match (kind, code) {
        (_, Some("rate_limit_exceeded")) | (Some("rate_limit_error"), _) => "rate_limit_error",
        (_, Some("insufficient_quota")) => "billing_error",
        (_, Some("overloaded")) => "overloaded_error",
        (_, Some("request_too_large")) => "request_too_large",
        (_, Some("provider_timeout")) => "timeout_error",
        (Some("invalid_request_error"), _) => "invalid_request_error",
        (Some("authentication_error"), _) => "authentication_error",
        (Some("permission_error"), _) => "permission_error",
        (Some("not_found_error"), _) => "not_found_error",
        _ => "api_error",
    }
}

#[derive(Serialize)]
struct ErrorEnvelope<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    error: ErrorBody<'a>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    message: &'a str,
}

fn anthropic_error(kind: &str, message: &str) -> Vec<u8> {
    let env = ErrorEnvelope {
        kind: "error",
        error: ErrorBody { kind, message },
    };
    serde_json::to_vec(&env).unwrap_or_else(|_| {
        br#"{"type":"error","error":{"type":"api_error","message":"internal error"}}"#.to_vec()
    })
}

/// Anthropic error body for an error the gateway raises, its type chosen
/// from the status.
pub fn error_body(error: &ApiError) -> Vec<u8> {
    anthropic_error(error_type_for_status(error.status), &error.message)
}

/// An OpenAI-shaped error body (what the gateway normalises provider errors
/// to) -> Anthropic error body for `status`. Non-JSON bodies are quoted.
pub fn chat_error_to_messages(status: u16, openai_error_body: &[u8]) -> Vec<u8> {
    let parsed: Option<Value> = from_slice_lossy(openai_error_body).ok();
    let code = parsed
        .as_ref()
        .and_then(|v| v.pointer("/error/code"))
        .and_then(Value::as_str);
    let kind = match (error_type_for_status(status), code) {
        // A 500 or 502 that says why is worth the specific type.
        ("api_error", Some("overloaded")) => "overloaded_error",
        ("api_error", Some("provider_timeout")) => "timeout_error",
        (kind, _) => kind,
    };
    let message = parsed
        .as_ref()
        .and_then(|v| {
            v.pointer("/error/message")
                .or_else(|| v.pointer("/message"))
                .or_else(|| v.get("error"))
                .and_then(Value::as_str)
        })
        .map(str::to_string)
        .unwrap_or_else(|| {
            let text = quoted(openai_error_body);
            if text.is_empty() {
                format!("The provider returned HTTP {status} with no details.")
            } else {
                format!("The provider returned HTTP {status}: {text}")
            }
        });
    anthropic_error(kind, &message)
}

// ---------------------------------------------------------------------------
// Streaming: OpenAI chat.completion.chunk SSE -> Anthropic SSE
// ---------------------------------------------------------------------------

#[derive(Serialize)]
struct MessageStart<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    message: StartMessage<'a>,
}

#[derive(Serialize)]
struct StartMessage<'a> {
    id: String,
    #[serde(rename = "type")]
    kind: &'static str,
    role: &'static str,
    model: &'a str,
    content: [(); 0],
    stop_reason: (),
    stop_sequence: (),
    usage: StartUsage,
}

#[derive(Serialize)]
struct StartUsage {
    input_tokens: u64,
    output_tokens: u64,
}

#[derive(Serialize)]
struct BlockStart<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    index: usize,
    content_block: Block<'a>,
}

#[derive(Serialize)]
struct BlockDelta<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    index: usize,
    delta: DeltaBody<'a>,
}

#[derive(Serialize)]
#[serde(tag = "type")]
enum DeltaBody<'a> {
    #[serde(rename = "text_delta")]
    Text { text: &'a str },
    #[serde(rename = "thinking_delta")]
    Thinking { thinking: &'a str },
    #[serde(rename = "input_json_delta")]
    InputJson { partial_json: &'a str },
}

#[derive(Serialize)]
struct BlockStop {
    #[serde(rename = "type")]
    kind: &'static str,
    index: usize,
}

#[derive(Serialize)]
struct MessageDelta {
    #[serde(rename = "type")]
    kind: &'static str,
    delta: StopDelta,
    usage: DeltaUsage,
}

#[derive(Serialize)]
struct StopDelta {
    stop_reason: &'static str,
    stop_sequence: (),
}

#[derive(Serialize)]
struct DeltaUsage {
    #[serde(skip_serializing_if = "Option::is_none")]
    input_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_creation_input_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_read_input_tokens: Option<u64>,
    output_tokens: u64,
}

/// The kind of the content block being written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpenBlock {
    Text,
    Thinking,
    Tool,
}

/// Streaming: OpenAI chat.completion.chunk SSE bytes in, Anthropic Messages
/// SSE bytes out.
pub type ChatStreamToMessages = EventStream<SseParser, ChunksToMessages>;

impl ChatStreamToMessages {
    pub fn new() -> Self {
        Self::default()
    }
}

/// The per-event mapping of [`ChatStreamToMessages`].
#[derive(Default)]
pub struct ChunksToMessages {
    /// `message_start` was written.
    started: bool,
    /// The block being written and its Anthropic index.
    open: Option<(usize, OpenBlock)>,
    /// Blocks started so far (the next block's index).
    blocks: usize,
    /// OpenAI tool-call index -> Anthropic block index.
    tool_blocks: Vec<(u64, usize)>,
    finish_reason: Option<String>,
    refused: bool,
    usage: Option<RawUsage>,
}

fn write_event(out: &mut Vec<u8>, name: &str, data: &impl Serialize) {
    match serde_json::to_vec(data) {
        Ok(json) => write_raw(out, name, &json),
        Err(e) => log::error!("could not serialize an Anthropic {name} event: {e}"),
    }
}

fn write_raw(out: &mut Vec<u8>, name: &str, json: &[u8]) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    out.extend_from_slice(json);
    out.extend_from_slice(b"\n\n");
}

impl EventMapping for ChunksToMessages {
    type Event = SseEvent;
    const UPSTREAM: &'static str = "provider's";

    fn on_event(&mut self, event: SseEvent, out: &mut Vec<u8>) -> Result<Flow, StreamFault> {
        let data = event.data.trim();
        if data == "[DONE]" {
            self.start(&Value::Null, out);
            self.end(out);
            return Ok(Flow::Ended);
        }
        let Ok(v) = from_str_lossy::<Value>(data) else {
            return Err(StreamFault::Corrupt);
        };
        if let Some(error) = v.get("error").filter(|e| !e.is_null()) {
            let message = str_field(error, "message")
                .or_else(|| error.as_str())
                .unwrap_or("The provider reported an error in the stream.");
            let kind = error_type_for_openai(str_field(error, "type"), str_field(error, "code"));
            write_raw(out, "error", &anthropic_error(kind, message));
            return Ok(Flow::Ended);
        }
        self.start(&v, out);
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            self.usage = Some(RawUsage::from_value(u));
        }
        let choice = v
            .get("choices")
            .and_then(Value::as_array)
            .and_then(|c| c.first());
        let Some(choice) = choice else {
            return Ok(Flow::Open);
        };
        if let Some(delta) = choice.get("delta") {
            self.delta(delta, out);
        }
        if let Some(reason) = str_field(choice, "finish_reason") {
            self.close_block(out);
            self.finish_reason = Some(reason.to_string());
        }
        Ok(Flow::Open)
    }

    fn write_error(&mut self, error: &ApiError, out: &mut Vec<u8>) {
        write_raw(out, "error", &anthropic_error("api_error", &error.message));
    }

    fn usage(&self) -> Option<Usage> {
        self.usage.map(|u| u.usage())
    }
}

impl ChunksToMessages {
    /// Writes `message_start` before anything else, from the first chunk.
    fn start(&mut self, chunk: &Value, out: &mut Vec<u8>) {
        if self.started {
            return;
        }
        self.started = true;
        let input_tokens = chunk
            .pointer("/usage/prompt_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let message = MessageStart {
            kind: "message_start",
            message: StartMessage {
                id: message_id(str_field(chunk, "id").unwrap_or_default()),
                kind: "message",
                role: "assistant",
                model: str_field(chunk, "model").unwrap_or_default(),
                content: [],
                stop_reason: (),
                stop_sequence: (),
                usage: StartUsage {
                    input_tokens,
                    output_tokens: 0,
                },
            },
        };
        write_event(out, "message_start", &message);
    }

    fn close_block(&mut self, out: &mut Vec<u8>) {
        if let Some((index, _)) = self.open.take() {
            let stop = BlockStop {
                kind: "content_block_stop",
                index,
            };
            write_event(out, "content_block_stop", &stop);
        }
    }

    /// Starts a new block (closing the open one) and returns its index.
    fn open_block(&mut self, kind: OpenBlock, block: Block<'_>, out: &mut Vec<u8>) -> usize {
        self.close_block(out);
        let index = self.blocks;
        self.blocks = self.blocks.saturating_add(1);
        let start = BlockStart {
            kind: "content_block_start",
            index,
            content_block: block,
        };
        write_event(out, "content_block_start", &start);
        self.open = Some((index, kind));
        index
    }

    /// The index of an open text or thinking block, opened if needed.
    fn text_block(&mut self, kind: OpenBlock, out: &mut Vec<u8>) -> usize {
        match self.open {
            Some((index, open)) if open == kind => index,
            _ => {
                let block = match kind {
                    OpenBlock::Thinking => Block::Thinking {
                        thinking: "",
                        signature: "",
                    },
                    _ => Block::Text { text: "" },
                };
                self.open_block(kind, block, out)
            }
        }
    }

    fn write_delta(&self, index: usize, delta: DeltaBody<'_>, out: &mut Vec<u8>) {
        let event = BlockDelta {
            kind: "content_block_delta",
            index,
            delta,
        };
        write_event(out, "content_block_delta", &event);
    }

    fn delta(&mut self, delta: &Value, out: &mut Vec<u8>) {
        if let Some(thinking) = reasoning_text(delta).filter(|t| !t.is_empty()) {
            let index = self.text_block(OpenBlock::Thinking, out);
            self.write_delta(index, DeltaBody::Thinking { thinking }, out);
        }
        if let Some(text) = str_field(delta, "content").filter(|t| !t.is_empty()) {
            let index = self.text_block(OpenBlock::Text, out);
            self.write_delta(index, DeltaBody::Text { text }, out);
        }
        if let Some(text) = str_field(delta, "refusal").filter(|t| !t.is_empty()) {
            self.refused = true;
            let index = self.text_block(OpenBlock::Text, out);
            self.write_delta(index, DeltaBody::Text { text }, out);
        }
        let calls = delta.get("tool_calls").and_then(Value::as_array);
        for call in calls.into_iter().flatten() {
            self.tool_call_delta(call, out);
        }
    }

    fn tool_call_delta(&mut self, call: &Value, out: &mut Vec<u8>) {
        let openai_index = call.get("index").and_then(Value::as_u64).unwrap_or(0);
        let known = self
            .tool_blocks
            .iter()
            .find(|(k, _)| *k == openai_index)
            .map(|(_, index)| *index);
        let index = match known {
            Some(index) => {
                if self.open != Some((index, OpenBlock::Tool)) {
                    // OpenAI finishes one call before the next; a server that
                    // interleaves still gets every fragment to its block.
                    log::warn!("tool call {openai_index} continued after its block was closed");
                }
                index
            }
            None => {
                let generated;
                let id = match str_field(call, "id") {
                    Some(id) => id,
                    None => {
                        generated = format!("toolu_{}_{openai_index}", self.blocks);
                        &generated
                    }
                };
                let name = call
                    .pointer("/function/name")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let block = Block::ToolUse {
                    id,
                    name,
                    input: Value::Object(Map::new()),
                };
                let index = self.open_block(OpenBlock::Tool, block, out);
                self.tool_blocks.push((openai_index, index));
                index
            }
        };
        let arguments = call
            .pointer("/function/arguments")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !arguments.is_empty() {
            let delta = DeltaBody::InputJson {
                partial_json: arguments,
            };
            self.write_delta(index, delta, out);
        }
    }

    /// `[DONE]`: close the open block, then `message_delta` and `message_stop`.
    fn end(&mut self, out: &mut Vec<u8>) {
        self.close_block(out);
        let usage = match self.usage {
            Some(u) => {
                let a = u.anthropic();
                DeltaUsage {
                    input_tokens: Some(a.input_tokens),
                    cache_creation_input_tokens: Some(a.cache_creation_input_tokens),
                    cache_read_input_tokens: Some(a.cache_read_input_tokens),
                    output_tokens: a.output_tokens,
                }
            }
            None => DeltaUsage {
                input_tokens: None,
                cache_creation_input_tokens: None,
                cache_read_input_tokens: None,
                output_tokens: 0,
            },
        };
        let delta = MessageDelta {
            kind: "message_delta",
            delta: StopDelta {
                stop_reason: stop_reason(
                    self.finish_reason.as_deref(),
                    !self.tool_blocks.is_empty(),
                    self.refused,
                ),
                stop_sequence: (),
            },
            usage,
        };
        write_event(out, "message_delta", &delta);
        write_raw(out, "message_stop", br#"{"type":"message_stop"}"#);
    }
}

// ---------------------------------------------------------------------------

/// Anthropic Messages callers.
pub struct Anthropic;
impl CallerTranslator for Anthropic {
    fn request_to_pivot(
        &self,
        body: &[u8],
        upstream_model: &str,
        _stream: bool,
    ) -> Result<Vec<u8>, ApiError> {
        Ok(messages_request_to_chat(body, upstream_model)?.0)
    }
    fn answer_from_pivot(&self, pivot: &[u8]) -> Result<Vec<u8>, String> {
        chat_response_to_messages(pivot)
    }
    fn error_body(&self, error: &ApiError) -> Vec<u8> {
        error_body(error)
    }
    fn error_from_pivot(&self, status: u16, pivot: &[u8]) -> Vec<u8> {
        chat_error_to_messages(status, pivot)
    }
    fn stream_from_pivot(&self, reads_pivot: bool) -> Box<dyn StreamTranslator> {
        let t = ChatStreamToMessages::new();
        Box::new(if reads_pivot { t.reading_pivot() } else { t })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT_STREAM: &str =
        include_str!("../../../tests/fixtures/openai/anthropic_caller_text_stream.sse");
    const TOOL_STREAM: &str =
        include_str!("../../../tests/fixtures/openai/anthropic_caller_tool_stream.sse");
    const TOOL_RESPONSE: &str =
        include_str!("../../../tests/fixtures/openai/anthropic_caller_response_tool.json");
    const AGENT_REQUEST: &str =
        include_str!("../../../tests/fixtures/anthropic/anthropic_caller_request_agent.json");

    // ----- requests --------------------------------------------------------

    fn translate(req: &Value) -> (Value, MessagesRequestInfo) {
        let body = serde_json::to_vec(req).unwrap();
        let (out, info) = messages_request_to_chat(&body, "gpt-4o").unwrap();
        (serde_json::from_slice(&out).unwrap(), info)
    }

    fn translate_err(req: &Value) -> ApiError {
        let body = serde_json::to_vec(req).unwrap();
        messages_request_to_chat(&body, "gpt-4o").unwrap_err()
    }

    /// A minimal valid request with `extra` fields merged in.
    fn req(extra: Value) -> Value {
        let mut base = json!({"model": "claude-sonnet-4-5", "max_tokens": 100,
                              "messages": [{"role": "user", "content": "Hi"}]});
        base.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        base
    }

    #[test]
    fn request_table() {
        let schema = json!({"type": "object", "properties": {"q": {"type": "string"}}});
        let table: Vec<(&str, Value, Value)> = vec![
            (
                "plain text",
                req(json!({})),
                json!({"model": "gpt-4o", "max_tokens": 100, "stream": false,
                       "messages": [{"role": "user", "content": "Hi"}]}),
            ),
            (
                "system string, multi-turn, sampling, stop sequences, user; hints dropped",
                req(json!({
                    "system": "Be terse.",
                    "messages": [
                        {"role": "user", "content": "What is 2+2?"},
                        {"role": "assistant", "content": "4"},
                        {"role": "user", "content": [{"type": "text", "text": "Times 3?",
                                                      "cache_control": {"type": "ephemeral"}}]}],
                    "temperature": 0.2, "top_p": 0.9, "top_k": null,
                    "stop_sequences": ["END"], "metadata": {"user_id": "u-1"},
                    "service_tier": "standard_only", "mcp_servers": []})),
                json!({"model": "gpt-4o", "max_tokens": 100, "stream": false,
                       "messages": [
                           {"role": "system", "content": "Be terse."},
                           {"role": "user", "content": "What is 2+2?"},
                           {"role": "assistant", "content": "4"},
                           {"role": "user", "content": "Times 3?"}],
                       "temperature": 0.2, "top_p": 0.9, "stop": ["END"], "user": "u-1"}),
            ),
            (
                "streaming always asks for usage; empty system and null metadata user skipped",
                req(json!({"stream": true, "system": "", "metadata": {"user_id": null}})),
                json!({"model": "gpt-4o", "max_tokens": 100, "stream": true,
                       "stream_options": {"include_usage": true},
                       "messages": [{"role": "user", "content": "Hi"}]}),
            ),
            (
                "several user blocks stay content parts; assistant-only thinking turn dropped",
                req(json!({"messages": [
                    {"role": "user", "content": [
                        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                    {"role": "assistant", "content": [
                        {"type": "redacted_thinking", "data": "EmwKAhgB"}]},
                    {"role": "user", "content": "c"}]})),
                json!({"model": "gpt-4o", "max_tokens": 100, "stream": false,
                       "messages": [
                           {"role": "user", "content": [
                               {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                           {"role": "user", "content": "c"}]}),
            ),
            (
                "thinking: max_completion_tokens and reasoning_effort",
                req(
                    json!({"thinking": {"type": "enabled", "budget_tokens": 8000},
                           "max_tokens": 16000}),
                ),
                json!({"model": "gpt-4o", "max_completion_tokens": 16000,
                       "reasoning_effort": "medium", "stream": false,
                       "messages": [{"role": "user", "content": "Hi"}]}),
            ),
            (
                "thinking disabled is plain max_tokens",
                req(json!({"thinking": {"type": "disabled"}})),
                json!({"model": "gpt-4o", "max_tokens": 100, "stream": false,
                       "messages": [{"role": "user", "content": "Hi"}]}),
            ),
            (
                "tool_choice any -> required; strict passed on",
                req(
                    json!({"tools": [{"name": "search", "input_schema": schema, "strict": true}],
                           "tool_choice": {"type": "any"}}),
                ),
                json!({"model": "gpt-4o", "max_tokens": 100, "stream": false,
                       "messages": [{"role": "user", "content": "Hi"}],
                       "tools": [{"type": "function", "function": {"name": "search",
                                  "parameters": schema, "strict": true}}],
                       "tool_choice": "required"}),
            ),
            (
                "tool_choice tool -> function; parallel calls off",
                req(
                    json!({"tools": [{"name": "search", "input_schema": schema}],
                           "tool_choice": {"type": "tool", "name": "search",
                                           "disable_parallel_tool_use": true}}),
                ),
                json!({"model": "gpt-4o", "max_tokens": 100, "stream": false,
                       "messages": [{"role": "user", "content": "Hi"}],
                       "tools": [{"type": "function", "function": {"name": "search",
                                  "parameters": schema}}],
                       "tool_choice": {"type": "function", "function": {"name": "search"}},
                       "parallel_tool_calls": false}),
            ),
            (
                "tool_choice none kept with tools",
                req(
                    json!({"tools": [{"name": "search", "input_schema": schema}],
                           "tool_choice": {"type": "none"}}),
                ),
                json!({"model": "gpt-4o", "max_tokens": 100, "stream": false,
                       "messages": [{"role": "user", "content": "Hi"}],
                       "tools": [{"type": "function", "function": {"name": "search",
                                  "parameters": schema}}],
                       "tool_choice": "none"}),
            ),
            (
                "tool_choice auto without tools: nothing sent, parallel flag ignored",
                req(json!({"tools": [], "tool_choice": {"type": "auto",
                                                        "disable_parallel_tool_use": true}})),
                json!({"model": "gpt-4o", "max_tokens": 100, "stream": false,
                       "messages": [{"role": "user", "content": "Hi"}]}),
            ),
            (
                "tool result with no content and one before text; final assistant prefill kept",
                req(json!({"messages": [
                    {"role": "user", "content": "Ping it"},
                    {"role": "assistant", "content": [
                        {"type": "tool_use", "id": "toolu_1", "name": "ping", "input": {}}]},
                    {"role": "user", "content": [
                        {"type": "text", "text": "Here:"},
                        {"type": "tool_result", "tool_use_id": "toolu_1"}]},
                    {"role": "assistant", "content": "{"}]})),
                json!({"model": "gpt-4o", "max_tokens": 100, "stream": false,
                       "messages": [
                           {"role": "user", "content": "Ping it"},
                           {"role": "assistant", "content": null, "tool_calls": [
                               {"id": "toolu_1", "type": "function",
                                "function": {"name": "ping", "arguments": "{}"}}]},
                           {"role": "tool", "tool_call_id": "toolu_1", "content": ""},
                           {"role": "user", "content": "Here:"},
                           {"role": "assistant", "content": "{"}]}),
            ),
        ];
        for (name, input, expected) in table {
            assert_eq!(translate(&input).0, expected, "{name}");
        }
    }

    #[test]
    fn agent_request_fixture() {
        let body = AGENT_REQUEST.as_bytes();
        let (out, info) = messages_request_to_chat(body, "gpt-4.1").unwrap();
        assert_eq!(info, MessagesRequestInfo { stream: true });
        let out: Value = serde_json::from_slice(&out).unwrap();
        let expected = json!({
            "model": "gpt-4.1",
            "max_tokens": 2048,
            "messages": [
                {"role": "system",
                 "content": "You are a travel assistant.\n\nUse the tools when useful."},
                {"role": "user", "content": [
                    {"type": "text", "text": "What is in this picture, and what's the weather there?"},
                    {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQSkZJRg=="}},
                    {"type": "image_url", "image_url": {"url": "https://upload.wikimedia.org/eiffel.jpg"}}]},
                {"role": "assistant",
                 "content": "That is the Eiffel Tower. Let me check.",
                 "tool_calls": [
                     {"id": "toolu_01A09q90qw90lq917835lq9", "type": "function",
                      "function": {"name": "get_weather", "arguments": "{\"location\":\"Paris, France\"}"}},
                     {"id": "toolu_01B18r81rx81mr826724mr8", "type": "function",
                      "function": {"name": "get_time", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "toolu_01A09q90qw90lq917835lq9",
                 "content": "18°C, cloudy"},
                {"role": "tool", "tool_call_id": "toolu_01B18r81rx81mr826724mr8",
                 "content": "Error: timezone unknown"},
                {"role": "user", "content": "Thanks! Summarise."}],
            "temperature": 0.3,
            "top_p": 0.9,
            "stop": ["\n\nHuman:", "END"],
            "user": "user-8f2c",
            "tools": [
                {"type": "function", "function": {"name": "get_weather",
                    "description": "Current weather for a location",
                    "parameters": {"type": "object",
                                   "properties": {"location": {"type": "string"}},
                                   "required": ["location"]}}},
                {"type": "function", "function": {"name": "get_time",
                    "parameters": {"type": "object", "properties": {}}}}],
            "tool_choice": "auto",
            "parallel_tool_calls": false,
            "stream": true,
            "stream_options": {"include_usage": true}
        });
        assert_eq!(out, expected);
    }

    #[test]
    fn thinking_budgets_map_to_efforts() {
        for (budget, effort) in [
            (1024, "low"),
            (EFFORT_MEDIUM_FROM - 1, "low"),
            (EFFORT_MEDIUM_FROM, "medium"),
            (EFFORT_HIGH_FROM - 1, "medium"),
            (EFFORT_HIGH_FROM, "high"),
            (64000, "high"),
        ] {
            let (out, _) = translate(&req(json!({
                "max_tokens": 100000,
                "thinking": {"type": "enabled", "budget_tokens": budget}})));
            assert_eq!(out["reasoning_effort"], effort, "{budget}");
            assert!(out.get("max_tokens").is_none());
        }
    }

    #[test]
    fn request_errors() {
        let user =
            |content: Value| req(json!({"messages": [{"role": "user", "content": content}]}));
        let table: Vec<(&str, Value, &str, Option<&str>, &str)> = vec![
            (
                "missing max_tokens",
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}]}),
                "missing_required_parameter",
                Some("max_tokens"),
                "max_tokens: Field required",
            ),
            (
                "zero max_tokens",
                req(json!({"max_tokens": 0})),
                "invalid_type",
                Some("max_tokens"),
                "positive integer",
            ),
            (
                "missing messages",
                json!({"model": "m", "max_tokens": 5}),
                "missing_required_parameter",
                Some("messages"),
                "messages: Field required",
            ),
            (
                "empty messages",
                req(json!({"messages": []})),
                "invalid_value",
                Some("messages"),
                "at least one message",
            ),
            (
                "top_k",
                req(json!({"top_k": 40})),
                "unsupported_parameter",
                Some("top_k"),
                "top_k is not supported",
            ),
            (
                "document block",
                user(json!([{"type": "document", "source": {"type": "base64",
                    "media_type": "application/pdf", "data": "JVBERi0="}}])),
                "unsupported_parameter",
                Some("messages"),
                "messages.0.content.0: content blocks of type 'document' are not supported",
            ),
            (
                "image file source",
                user(json!([{"type": "image", "source": {"type": "file", "file_id": "file_1"}}])),
                "unsupported_parameter",
                Some("messages"),
                "image sources of type 'file'",
            ),
            (
                "image without source",
                user(json!([{"type": "image"}])),
                "invalid_value",
                Some("messages"),
                "messages.0.content.0.source: Field required",
            ),
            (
                "image in a tool result",
                req(json!({"messages": [{"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "t", "content": [
                        {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]}]}]})),
                "unsupported_parameter",
                Some("messages"),
                "messages.0.content.0.content.0: tool results with 'image' blocks",
            ),
            (
                "server tool",
                req(json!({"tools": [{"type": "web_search_20250305", "name": "web_search"}]})),
                "unsupported_parameter",
                Some("tools"),
                "server tool 'web_search_20250305'",
            ),
            (
                "tool without input_schema",
                req(json!({"tools": [{"name": "x"}]})),
                "invalid_value",
                Some("tools"),
                "tools.0.input_schema: Field required",
            ),
            (
                "forced tool without tools",
                req(json!({"tool_choice": {"type": "any"}})),
                "invalid_value",
                Some("tool_choice"),
                "requires a tool",
            ),
            (
                "bad tool_choice type",
                req(
                    json!({"tools": [{"name": "x", "input_schema": {"type": "object"}}],
                           "tool_choice": {"type": "required"}}),
                ),
                "invalid_value",
                Some("tool_choice"),
                "tool_choice.type",
            ),
            (
                "system role in messages",
                req(json!({"messages": [{"role": "system", "content": "x"}]})),
                "invalid_value",
                Some("messages"),
                "messages.0.role: Input should be 'user' or 'assistant'",
            ),
            (
                "empty user content",
                user(json!([])),
                "invalid_value",
                Some("messages"),
                "non-empty content",
            ),
            (
                "tool_use input not an object",
                req(json!({"messages": [{"role": "assistant", "content": [
                    {"type": "tool_use", "id": "t", "name": "n", "input": [1]}]}]})),
                "invalid_value",
                Some("messages"),
                "messages.0.content.0.input: Input should be an object",
            ),
            (
                "thinking without budget",
                req(json!({"thinking": {"type": "enabled"}})),
                "invalid_value",
                Some("thinking"),
                "thinking.budget_tokens: Field required",
            ),
            (
                "thinking of an unknown type",
                req(json!({"thinking": {"type": "on"}})),
                "invalid_value",
                Some("thinking"),
                "thinking.type",
            ),
            (
                "non-text system block",
                req(json!({"system": [{"type": "image"}]})),
                "invalid_value",
                Some("system"),
                "system.0",
            ),
            (
                "stream not a boolean",
                req(json!({"stream": "yes"})),
                "invalid_type",
                Some("stream"),
                "boolean",
            ),
            (
                "temperature not a number",
                req(json!({"temperature": "hot"})),
                "invalid_type",
                Some("temperature"),
                "number",
            ),
            (
                "mcp servers",
                req(json!({"mcp_servers": [{"type": "url", "url": "https://mcp", "name": "m"}]})),
                "unsupported_parameter",
                Some("mcp_servers"),
                "mcp_servers",
            ),
            (
                "output_format",
                req(json!({"output_format": {"type": "json_schema", "schema": {}}})),
                "unsupported_parameter",
                Some("output_format"),
                "output_format",
            ),
        ];
        for (name, input, code, param, text) in table {
            let e = translate_err(&input);
            assert_eq!(e.status, 400, "{name}");
            assert_eq!(e.code, Some(code), "{name}: {}", e.message);
            assert_eq!(e.param, param, "{name}");
            assert!(e.message.contains(text), "{name}: {}", e.message);
            // The caller sees it in Anthropic's shape.
            let v: Value = serde_json::from_slice(&error_body(&e)).unwrap();
            assert_eq!(v["type"], "error");
            assert_eq!(v["error"]["type"], "invalid_request_error");
            assert_eq!(v["error"]["message"], e.message.as_str());
        }
        for body in [&b"{not json"[..], b"[1]"] {
            let e = messages_request_to_chat(body, "m").unwrap_err();
            assert_eq!((e.status, e.code), (400, Some("invalid_json")));
        }
    }

    // ----- responses -------------------------------------------------------

    fn respond(body: &Value) -> Value {
        let out = chat_response_to_messages(&serde_json::to_vec(body).unwrap()).unwrap();
        serde_json::from_slice(&out).unwrap()
    }

    fn completion(message: Value, finish: &str) -> Value {
        json!({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
               "choices": [{"index": 0, "message": message, "finish_reason": finish}],
               "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}})
    }

    #[test]
    fn tool_response_fixture() {
        let out: Value =
            serde_json::from_slice(&chat_response_to_messages(TOOL_RESPONSE.as_bytes()).unwrap())
                .unwrap();
        assert_eq!(
            out,
            json!({
                "id": "msg_chatcmpl-BZtq9aLkP2mXw3Rt6YbNc8Vd1EfGh",
                "type": "message",
                "role": "assistant",
                "model": "gpt-4o-2024-08-06",
                "content": [
                    {"type": "text", "text": "Checking both."},
                    {"type": "tool_use", "id": "call_Vx3bWq0yH6cKq9Jm2TfLzR1a",
                     "name": "get_weather",
                     "input": {"location": "Paris, France", "unit": "celsius"}},
                    {"type": "tool_use", "id": "call_Qm8TnZ4pLs2RvW7yXc5dKe0b",
                     "name": "get_time", "input": {"timezone": "Europe/Paris"}}],
                "stop_reason": "tool_use",
                "stop_sequence": null,
                "usage": {"input_tokens": 328, "cache_creation_input_tokens": 0,
                          "cache_read_input_tokens": 512, "output_tokens": 89}
            })
        );
    }

    #[test]
    fn response_table() {
        let table: Vec<(&str, Value, Value, &str)> = vec![
            (
                "plain text",
                completion(json!({"role": "assistant", "content": "Hi!"}), "stop"),
                json!([{"type": "text", "text": "Hi!"}]),
                "end_turn",
            ),
            (
                "reasoning first, then text",
                completion(
                    json!({"role": "assistant", "content": "42", "reasoning_content": "Think."}),
                    "length",
                ),
                json!([{"type": "thinking", "thinking": "Think.", "signature": ""},
                       {"type": "text", "text": "42"}]),
                "max_tokens",
            ),
            (
                "`reasoning` spelling",
                completion(
                    json!({"role": "assistant", "content": "ok", "reasoning": "Hmm."}),
                    "stop",
                ),
                json!([{"type": "thinking", "thinking": "Hmm.", "signature": ""},
                       {"type": "text", "text": "ok"}]),
                "end_turn",
            ),
            (
                "content filter",
                completion(
                    json!({"role": "assistant", "content": null}),
                    "content_filter",
                ),
                json!([]),
                "refusal",
            ),
            (
                "refusal field",
                completion(
                    json!({"role": "assistant", "content": null, "refusal": "I can't help."}),
                    "stop",
                ),
                json!([{"type": "text", "text": "I can't help."}]),
                "refusal",
            ),
            (
                "tool calls reported with finish_reason stop; bad and empty arguments -> {}",
                completion(
                    json!({"role": "assistant", "content": "", "tool_calls": [
                        {"id": "c1", "type": "function",
                         "function": {"name": "a", "arguments": "{\"x\": tru"}},
                        {"id": "c2", "type": "function", "function": {"name": "b", "arguments": ""}},
                        {"id": "c3", "type": "function", "function": {"name": "c", "arguments": "[1]"}}]}),
                    "stop",
                ),
                json!([{"type": "tool_use", "id": "c1", "name": "a", "input": {}},
                       {"type": "tool_use", "id": "c2", "name": "b", "input": {}},
                       {"type": "tool_use", "id": "c3", "name": "c", "input": {}}]),
                "tool_use",
            ),
            (
                "unknown finish reason",
                completion(json!({"role": "assistant", "content": "x"}), "eos"),
                json!([{"type": "text", "text": "x"}]),
                "end_turn",
            ),
        ];
        for (name, input, content, stop) in table {
            let out = respond(&input);
            assert_eq!(out["content"], content, "{name}");
            assert_eq!(out["stop_reason"], stop, "{name}");
            assert!(out["stop_sequence"].is_null(), "{name}");
            assert_eq!(out["id"], "msg_chatcmpl-1");
            assert_eq!(
                out["usage"],
                json!({"input_tokens": 10, "cache_creation_input_tokens": 0,
                       "cache_read_input_tokens": 0, "output_tokens": 5})
            );
        }
    }

    #[test]
    fn response_ids_and_missing_usage() {
        let mut body = completion(json!({"role": "assistant", "content": "x"}), "stop");
        body["id"] = json!("msg_abc");
        body.as_object_mut().unwrap().remove("usage");
        let out = respond(&body);
        assert_eq!(out["id"], "msg_abc");
        assert_eq!(out["usage"]["input_tokens"], 0);
        assert!(chat_response_to_messages(b"not json").is_err());
        assert!(chat_response_to_messages(br#"{"choices": []}"#).is_err());
    }

    // ----- errors ----------------------------------------------------------

    #[test]
    fn error_types_follow_the_status() {
        for (status, kind) in [
            (400, "invalid_request_error"),
            (401, "authentication_error"),
            (402, "billing_error"),
            (403, "permission_error"),
            (404, "not_found_error"),
            (413, "request_too_large"),
            (422, "invalid_request_error"),
            (429, "rate_limit_error"),
            (500, "api_error"),
            (502, "api_error"),
            (503, "overloaded_error"),
            (504, "timeout_error"),
            (529, "overloaded_error"),
            (418, "api_error"),
        ] {
            let e = ApiError::new(status, "whatever", None, "boom".into());
            let v: Value = serde_json::from_slice(&error_body(&e)).unwrap();
            assert_eq!(
                v,
                json!({"type": "error", "error": {"type": kind, "message": "boom"}}),
                "{status}"
            );
        }
    }

    #[test]
    fn provider_errors_are_reshaped() {
        let table: &[(u16, &[u8], &str, &str)] = &[
            (
                429,
                br#"{"error":{"message":"Rate limit reached","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#,
                "rate_limit_error",
                "Rate limit reached",
            ),
            (
                401,
                br#"{"error":{"message":"Incorrect API key provided: [redacted].","type":"invalid_request_error","code":"invalid_api_key"}}"#,
                "authentication_error",
                "Incorrect API key provided: [redacted].",
            ),
            (
                500,
                br#"{"error":{"message":"busy","type":"server_error","code":"overloaded"}}"#,
                "overloaded_error",
                "busy",
            ),
            (
                502,
                br#"{"error":{"message":"Provider \"x\" did not answer in time","type":"server_error","code":"provider_timeout"}}"#,
                "timeout_error",
                "did not answer in time",
            ),
            (
                404,
                br#"{"error":"model not found"}"#,
                "not_found_error",
                "model not found",
            ),
            (
                502,
                b"Bad Gateway",
                "api_error",
                "The provider returned HTTP 502: Bad Gateway",
            ),
            (503, b"", "overloaded_error", "HTTP 503 with no details"),
        ];
        for (status, body, kind, text) in table {
            let v: Value = serde_json::from_slice(&chat_error_to_messages(*status, body)).unwrap();
            assert_eq!(v["type"], "error");
            assert_eq!(v["error"]["type"], *kind, "{status}");
            let msg = v["error"]["message"].as_str().unwrap();
            assert!(msg.contains(text), "{msg}");
        }
        let long = vec![b'x'; 10_000];
        assert!(chat_error_to_messages(500, &long).len() < 1_000);
    }

    // ----- streaming -------------------------------------------------------

    fn run_pieces(pieces: &[&[u8]]) -> Vec<u8> {
        let mut t = ChatStreamToMessages::new();
        let mut out = Vec::new();
        for p in pieces {
            t.push(p, &mut out);
        }
        t.finish(&mut out);
        out
    }

    fn run(input: &[u8]) -> Vec<u8> {
        run_pieces(&[input])
    }

    /// What an Anthropic SDK would make of the stream, checking the event
    /// grammar as it goes: message_start first; blocks numbered from 0 in
    /// order, one open at a time, each delta for the open block and of its
    /// type; message_delta after the last block; message_stop or an error
    /// last.
    #[derive(Debug, Default)]
    struct Assembled {
        message: Value,
        /// type, text (text or thinking or raw tool JSON), id, name
        blocks: Vec<(String, String, String, String)>,
        stop_reason: Option<String>,
        delta_usage: Option<Value>,
        stopped: bool,
        error: Option<Value>,
        names: Vec<String>,
    }

    fn assemble(out: &[u8]) -> Assembled {
        let text = std::str::from_utf8(out).unwrap();
        assert!(text.is_empty() || text.ends_with("\n\n"), "{text}");
        let mut a = Assembled::default();
        let mut open: Option<usize> = None;
        for raw in text.split_terminator("\n\n") {
            assert!(
                a.error.is_none() && !a.stopped,
                "event after the end: {raw}"
            );
            let (name_line, data_line) = raw.split_once('\n').unwrap();
            let name = name_line.strip_prefix("event: ").unwrap();
            let data: Value =
                serde_json::from_str(data_line.strip_prefix("data: ").unwrap()).unwrap();
            assert_eq!(data["type"], name, "{raw}");
            a.names.push(name.to_string());
            if name != "error" && name != "message_start" {
                assert!(a.message.is_object(), "{name} before message_start");
            }
            match name {
                "message_start" => {
                    assert!(a.message.is_null(), "message_start twice");
                    a.message = data["message"].clone();
                    assert_eq!(a.message["type"], "message");
                    assert_eq!(a.message["role"], "assistant");
                    assert_eq!(a.message["content"], json!([]));
                    assert!(a.message["id"].as_str().unwrap().starts_with("msg_"));
                    assert!(a.message["usage"]["input_tokens"].is_u64());
                }
                "content_block_start" => {
                    assert_eq!(open, None, "a block is still open: {raw}");
                    let index = data["index"].as_u64().unwrap() as usize;
                    assert_eq!(index, a.blocks.len(), "{raw}");
                    let block = &data["content_block"];
                    let kind = block["type"].as_str().unwrap().to_string();
                    match kind.as_str() {
                        "text" => assert_eq!(block["text"], ""),
                        "thinking" => {
                            assert_eq!(block["thinking"], "");
                            assert!(block["signature"].is_string());
                        }
                        "tool_use" => assert_eq!(block["input"], json!({})),
                        other => panic!("unexpected block {other}"),
                    }
                    let field = |n: &str| block[n].as_str().unwrap_or_default().to_string();
                    a.blocks
                        .push((kind, String::new(), field("id"), field("name")));
                    open = Some(index);
                }
                "content_block_delta" => {
                    let index = data["index"].as_u64().unwrap() as usize;
                    assert_eq!(open, Some(index), "{raw}");
                    let block = &mut a.blocks[index];
                    let delta = &data["delta"];
                    let (want, field) = match delta["type"].as_str().unwrap() {
                        "text_delta" => ("text", "text"),
                        "thinking_delta" => ("thinking", "thinking"),
                        "input_json_delta" => ("tool_use", "partial_json"),
                        other => panic!("unexpected delta {other}"),
                    };
                    assert_eq!(block.0, want, "{raw}");
                    let piece = delta[field].as_str().unwrap();
                    assert!(!piece.is_empty(), "{raw}");
                    block.1.push_str(piece);
                }
                "content_block_stop" => {
                    let index = data["index"].as_u64().unwrap() as usize;
                    assert_eq!(open, Some(index), "{raw}");
                    open = None;
                }
                "message_delta" => {
                    assert_eq!(open, None, "message_delta with an open block");
                    assert!(a.stop_reason.is_none(), "message_delta twice");
                    a.stop_reason = Some(data["delta"]["stop_reason"].as_str().unwrap().into());
                    assert!(data["delta"]["stop_sequence"].is_null());
                    assert!(data["usage"]["output_tokens"].is_u64());
                    a.delta_usage = Some(data["usage"].clone());
                }
                "message_stop" => {
                    assert!(a.stop_reason.is_some(), "message_stop before message_delta");
                    a.stopped = true;
                }
                "error" => a.error = Some(data["error"].clone()),
                other => panic!("unexpected event {other}"),
            }
        }
        a
    }

    /// All at once, event by event, byte by byte, split in two anywhere.
    fn assert_chunking_invariant(input: &str) -> Vec<u8> {
        let whole = run(input.as_bytes());
        let events: Vec<&[u8]> = input.split_inclusive("\n\n").map(str::as_bytes).collect();
        assert_eq!(run_pieces(&events), whole, "event by event");
        let bytes: Vec<&[u8]> = input.as_bytes().chunks(1).collect();
        assert_eq!(run_pieces(&bytes), whole, "byte by byte");
        for at in 0..=input.len() {
            let (a, b) = input.as_bytes().split_at(at);
            assert_eq!(run_pieces(&[a, b]), whole, "split at {at}");
        }
        for ending in ["\r\n", "\r"] {
            let converted = input.replace('\n', ending);
            assert_eq!(run(converted.as_bytes()), whole, "{ending:?}");
            let bytes: Vec<&[u8]> = converted.as_bytes().chunks(1).collect();
            assert_eq!(run_pieces(&bytes), whole, "{ending:?} byte by byte");
        }
        whole
    }

    #[test]
    fn text_stream_with_reasoning() {
        let out = assert_chunking_invariant(TEXT_STREAM);
        let a = assemble(&out);
        assert_eq!(
            a.message["id"],
            "msg_chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG"
        );
        assert_eq!(a.message["model"], "deepseek-reasoner");
        assert_eq!(
            a.message["usage"],
            json!({"input_tokens": 0, "output_tokens": 0})
        );
        let blocks: Vec<(&str, &str)> = a
            .blocks
            .iter()
            .map(|b| (b.0.as_str(), b.1.as_str()))
            .collect();
        assert_eq!(
            blocks,
            vec![
                ("thinking", "The user greets me. Answer briefly."),
                (
                    "text",
                    "Hello, café ☕ — ça va? 👋\nSecond line with \"quotes\"."
                ),
            ]
        );
        assert_eq!(a.stop_reason.as_deref(), Some("end_turn"));
        assert_eq!(
            a.delta_usage,
            Some(
                json!({"input_tokens": 101, "cache_creation_input_tokens": 0,
                        "cache_read_input_tokens": 1024, "output_tokens": 42})
            )
        );
        assert!(a.stopped && a.error.is_none());
        assert_eq!(a.names.last().map(String::as_str), Some("message_stop"));
    }

    #[test]
    fn parallel_tool_stream_gets_one_block_per_call() {
        let out = assert_chunking_invariant(TOOL_STREAM);
        let a = assemble(&out);
        assert_eq!(a.message["model"], "gpt-4o-2024-08-06");
        assert_eq!(a.blocks.len(), 3);
        assert_eq!(a.blocks[0].0, "text");
        assert_eq!(a.blocks[0].1, "Checking both.");
        let tools: Vec<(&str, &str, Value)> = a.blocks[1..]
            .iter()
            .map(|b| {
                assert_eq!(b.0, "tool_use");
                (
                    b.2.as_str(),
                    b.3.as_str(),
                    serde_json::from_str(&b.1).unwrap(),
                )
            })
            .collect();
        assert_eq!(
            tools,
            vec![
                (
                    "call_Vx3bWq0yH6cKq9Jm2TfLzR1a",
                    "get_weather",
                    json!({"location": "Paris, France", "unit": "celsius"})
                ),
                (
                    "call_Qm8TnZ4pLs2RvW7yXc5dKe0b",
                    "get_time",
                    json!({"timezone": "Europe/Paris"})
                ),
            ]
        );
        assert_eq!(a.stop_reason.as_deref(), Some("tool_use"));
        assert_eq!(
            a.delta_usage,
            Some(
                json!({"input_tokens": 840, "cache_creation_input_tokens": 0,
                        "cache_read_input_tokens": 0, "output_tokens": 89})
            )
        );
        assert!(a.stopped);
    }

    #[test]
    fn usage_is_reported_to_the_filter() {
        let mut t = ChatStreamToMessages::new();
        let mut out = Vec::new();
        let (head, _) = TEXT_STREAM.split_at(TEXT_STREAM.find("\"choices\":[]").unwrap());
        t.push(head.as_bytes(), &mut out);
        assert_eq!(t.usage(), None);
        t.push(&TEXT_STREAM.as_bytes()[head.len()..], &mut out);
        assert_eq!(
            t.usage(),
            Some(Usage {
                input_tokens: 1125,
                output_tokens: 42,
                cached_input_tokens: 1024,
                reasoning_tokens: 12
            })
        );
    }

    /// Output appears as soon as the upstream event producing it completes.
    #[test]
    fn nothing_is_held_back() {
        for fixture in [TEXT_STREAM, TOOL_STREAM] {
            let full = run(fixture.as_bytes());
            let mut t = ChatStreamToMessages::new();
            let mut out = Vec::new();
            for event in fixture.split_inclusive("\n\n") {
                let before = out.len();
                let (body, end) = event.split_at(event.len() - 1);
                t.push(body.as_bytes(), &mut out);
                assert_eq!(out.len(), before, "output before the event ended: {event}");
                t.push(end.as_bytes(), &mut out);
                assert!(full.starts_with(&out));
            }
            assert_eq!(out, full);
        }
    }

    fn chunk(delta: Value, finish: Option<&str>) -> String {
        let v = json!({"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1,
                       "model": "m", "choices": [{"index": 0, "delta": delta,
                                                  "finish_reason": finish}]});
        format!("data: {v}\n\n")
    }

    #[test]
    fn tool_calls_in_one_delta_and_without_ids() {
        // Some servers send whole calls, several in one delta, ids missing.
        let input = format!(
            "{}{}data: [DONE]\n\n",
            chunk(
                json!({"role": "assistant", "tool_calls": [
                    {"index": 0, "id": "c0", "type": "function",
                     "function": {"name": "a", "arguments": "{\"x\":1}"}},
                    {"index": 1, "type": "function",
                     "function": {"name": "b", "arguments": "{}"}}]}),
                None
            ),
            chunk(json!({}), Some("stop")),
        );
        let a = assemble(&run(input.as_bytes()));
        assert_eq!(a.blocks.len(), 2);
        assert_eq!(
            (a.blocks[0].2.as_str(), a.blocks[0].1.as_str()),
            ("c0", "{\"x\":1}")
        );
        assert_eq!(a.blocks[1].3, "b");
        assert!(a.blocks[1].2.starts_with("toolu_"));
        assert_eq!(
            a.stop_reason.as_deref(),
            Some("tool_use"),
            "tool calls win over stop"
        );
        assert_eq!(a.delta_usage, Some(json!({"output_tokens": 0})));
    }

    #[test]
    fn finish_reasons_map_to_stop_reasons() {
        for (finish, stop) in [
            (Some("stop"), "end_turn"),
            (Some("length"), "max_tokens"),
            (Some("content_filter"), "refusal"),
            (Some("tool_calls"), "tool_use"),
            (None, "end_turn"),
        ] {
            let input = format!(
                "{}{}data: [DONE]\n\n",
                chunk(json!({"content": "x"}), None),
                chunk(json!({}), finish)
            );
            let a = assemble(&run(input.as_bytes()));
            assert_eq!(a.stop_reason.as_deref(), Some(stop), "{finish:?}");
            assert!(a.stopped);
        }
        let input = format!(
            "{}{}data: [DONE]\n\n",
            chunk(json!({"refusal": "No."}), None),
            chunk(json!({}), Some("stop"))
        );
        let a = assemble(&run(input.as_bytes()));
        assert_eq!(a.blocks[0].1, "No.");
        assert_eq!(a.stop_reason.as_deref(), Some("refusal"));
    }

    #[test]
    fn done_alone_is_a_complete_empty_message() {
        let a = assemble(&run(b"data: [DONE]\n\n"));
        assert!(a.message.is_object() && a.blocks.is_empty() && a.stopped);
        assert_eq!(a.message["id"], "msg_gateway");
        assert_eq!(a.stop_reason.as_deref(), Some("end_turn"));
    }

    #[test]
    fn error_event_ends_the_stream() {
        let head: String = TOOL_STREAM.split_inclusive("\n\n").take(5).collect();
        let input = format!(
            "{head}data: {{\"error\":{{\"message\":\"Overloaded\",\"type\":\"server_error\",\"param\":null,\"code\":\"overloaded\"}}}}\n\n{}data: [DONE]\n\n",
            chunk(json!({"content": "late"}), None)
        );
        let mut t = ChatStreamToMessages::new();
        let mut out = Vec::new();
        t.push(input.as_bytes(), &mut out);
        let a = assemble(&out);
        assert_eq!(
            a.error,
            Some(json!({"type": "overloaded_error", "message": "Overloaded"}))
        );
        assert!(!a.stopped && a.stop_reason.is_none());
        assert!(!a.blocks.iter().any(|b| b.1.contains("late")));
        let len = out.len();
        t.finish(&mut out);
        t.push(b"data: [DONE]\n\n", &mut out);
        assert_eq!(out.len(), len, "nothing after an error");

        for (error, kind) in [
            (
                json!({"message": "slow down", "type": "rate_limit_error"}),
                "rate_limit_error",
            ),
            (
                json!({"message": "x", "type": "server_error", "code": "stream_interrupted"}),
                "api_error",
            ),
            (
                json!({"message": "bad", "type": "invalid_request_error"}),
                "invalid_request_error",
            ),
            (json!("plain string"), "api_error"),
        ] {
            let input = format!("data: {}\n\n", json!({"error": error}));
            let a = assemble(&run(input.as_bytes()));
            assert_eq!(a.error.as_ref().unwrap()["type"], kind, "{error}");
            assert!(a.message.is_null(), "an error first needs no message_start");
        }
    }

    #[test]
    fn truncated_stream_ends_with_an_error_event() {
        let events: Vec<&str> = TOOL_STREAM.split_inclusive("\n\n").collect();
        let cuts = [
            0,
            TOOL_STREAM.len() / 2,
            // Everything but [DONE]: finish reason and usage came, not the end.
            TOOL_STREAM.len() - events.last().unwrap().len(),
            // Inside [DONE].
            TOOL_STREAM.len() - 3,
        ];
        for cut in cuts {
            let out = run(&TOOL_STREAM.as_bytes()[..cut]);
            let a = assemble(&out);
            assert!(!a.stopped, "cut {cut}");
            assert!(a.stop_reason.is_none(), "cut {cut}");
            let error = a.error.unwrap();
            assert_eq!(error["type"], "api_error");
            assert!(error["message"]
                .as_str()
                .unwrap()
                .contains("ended before completion"));
        }
    }

    #[test]
    fn finish_is_idempotent_and_silent_after_done() {
        let mut t = ChatStreamToMessages::new();
        let mut out = Vec::new();
        t.push(TEXT_STREAM.as_bytes(), &mut out);
        let len = out.len();
        assert!(out.ends_with(b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"));
        t.finish(&mut out);
        t.push(b"data: [DONE]\n\n", &mut out);
        assert_eq!(out.len(), len);

        let mut t = ChatStreamToMessages::new();
        let mut out = Vec::new();
        t.push(&TEXT_STREAM.as_bytes()[..700], &mut out);
        t.finish(&mut out);
        let len = out.len();
        t.finish(&mut out);
        t.push(&TEXT_STREAM.as_bytes()[700..], &mut out);
        assert_eq!(out.len(), len, "nothing after the interruption error");
    }

    #[test]
    fn comments_are_ignored() {
        let plain = run(TEXT_STREAM.as_bytes());
        let noisy = TEXT_STREAM.replacen("data: ", ": keep-alive\n\ndata: ", 2);
        assert_ne!(noisy, TEXT_STREAM);
        assert_eq!(run(noisy.as_bytes()), plain);
    }

    #[test]
    fn late_fragment_for_a_closed_tool_block_still_reaches_it() {
        let input = format!(
            "{}{}{}{}data: [DONE]\n\n",
            chunk(
                json!({"tool_calls": [{"index": 0, "id": "a", "function": {"name": "f", "arguments": "{\"x\""}}]}),
                None
            ),
            chunk(
                json!({"tool_calls": [{"index": 1, "id": "b", "function": {"name": "g", "arguments": "{}"}}]}),
                None
            ),
            chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": ":1}"}}]}),
                None
            ),
            chunk(json!({}), Some("tool_calls")),
        );
        let text = String::from_utf8(run(input.as_bytes())).unwrap();
        assert!(text.contains(
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":":1}"}}"#
        ));
        assert!(text.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"));
    }
}
