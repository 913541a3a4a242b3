//! OpenAI Chat Completions callers reaching Anthropic Messages API models.
//!
//! * [`chat_request_to_messages`]: the caller's request body, rewritten for
//!   `POST /v1/messages`.
//! * [`messages_response_to_chat`], [`messages_error_to_chat`],
//!   [`caller_status`]: a non-streamed answer back into OpenAI's shapes.
//! * [`MessagesStreamToChat`]: Anthropic's server-sent events translated
//!   into `chat.completion.chunk` events, one upstream event at a time.

use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::core::api_error::{error_type_for_status, ApiError};
use crate::core::json::{from_slice_lossy, from_str_lossy};
use crate::core::sse::{SseEvent, SseParser};
use crate::core::usage::Usage;
use crate::translate::chat_input::{
    bad_message, has_prefix_ignore_case, invalid_type, json_type, plain_text, quoted, unsupported,
};
use crate::translate::chat_output::{
    write_data, CachedTokens, ChatCompletion, ChatMessage, ChatUsage, Choice, Delta, FunctionCall,
    FunctionDelta, PivotChunks, ToolCall, ToolCallDelta,
};
use crate::translate::outbound::{request_body, ProviderTranslator, Upstream};
use crate::translate::pivot::{ChatRequest, ResponseFormat, Role, Tool, ToolChoice};
use crate::translate::stream::{EventMapping, EventStream, Flow};
use crate::translate::{StreamFault, StreamTranslator};

/// Thinking budgets for OpenAI's `reasoning_effort` values.
const THINKING_BUDGETS: [(&str, u64); 3] = [("low", 1024), ("medium", 4096), ("high", 16384)];
/// Room left for the answer when a thinking budget outgrows `max_tokens`.
const THINKING_HEADROOM: u64 = 1024;

/// What the filter needs to know about a translated request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChatRequestInfo {
    pub stream: bool,
    /// `stream_options.include_usage`: send a final usage chunk.
    pub include_usage: bool,
}

// ---------------------------------------------------------------------------
// Request: OpenAI chat completions -> Anthropic messages
// ---------------------------------------------------------------------------

/// A message's content on its way to Anthropic.
enum Content {
    Text(String),
    Blocks(Vec<Value>),
}

impl Content {
    fn into_blocks(self) -> Vec<Value> {
        match self {
            Content::Text(t) => vec![text_block(t)],
            Content::Blocks(b) => b,
        }
    }

    fn into_value(self) -> Value {
        match self {
            Content::Text(t) => Value::String(t),
            Content::Blocks(b) => Value::Array(b),
        }
    }
}

/// One Anthropic message: its role and content.
type Turn = (&'static str, Content);

fn text_block(text: String) -> Value {
    json!({"type": "text", "text": text})
}

/// Appends a turn, merging it into the previous one when the role repeats:
/// Anthropic wants user and assistant turns to alternate, and parallel tool
/// results in one user message.
fn push_turn(turns: &mut Vec<Turn>, role: &'static str, content: Content) {
    if let Some((last_role, last)) = turns.last_mut() {
        if *last_role == role {
            let mut blocks = std::mem::replace(last, Content::Blocks(Vec::new())).into_blocks();
            blocks.extend(content.into_blocks());
            *last = Content::Blocks(blocks);
            return;
        }
    }
    turns.push((role, content));
}

fn image_block(url: &str, i: usize, j: usize) -> Result<Value, ApiError> {
    if let Some(rest) = url.strip_prefix("data:") {
        let media_type = rest
            .split_once(',')
            .and_then(|(meta, data)| Some((meta.strip_suffix(";base64")?, data)))
            .and_then(|(meta, data)| {
                let mime = meta.split(';').next().unwrap_or_default();
                (!mime.is_empty()).then_some((mime, data))
            });
        let Some((mime, data)) = media_type else {
            return Err(bad_message(format!(
                "messages[{i}].content[{j}].image_url.url: only base64 data URLs \
                 (data:<media type>;base64,<data>) are supported."
            )));
        };
        return Ok(json!({
            "type": "image",
            "source": {"type": "base64", "media_type": mime, "data": data}
        }));
    }
    if has_prefix_ignore_case(url, "https://") || has_prefix_ignore_case(url, "http://") {
        return Ok(json!({"type": "image", "source": {"type": "url", "url": url}}));
    }
    Err(bad_message(format!(
        "messages[{i}].content[{j}].image_url.url must be an http(s) URL or a base64 data URL."
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
             by the Anthropic provider through this gateway; use 'text' or 'image_url'."
        ))),
    }
}

fn user_content(content: &Value, i: usize) -> Result<Content, ApiError> {
    match content {
        Value::String(s) => Ok(Content::Text(s.clone())),
        Value::Array(parts) => parts
            .iter()
            .enumerate()
            .map(|(j, p)| user_part(p, i, j))
            .collect::<Result<Vec<_>, _>>()
            .map(Content::Blocks),
        other => Err(bad_message(format!(
            "messages[{i}].content must be a string or an array of content parts, not {}.",
            json_type(other)
        ))),
    }
}

/// `messages` split into Anthropic's top-level `system` and alternating turns.
fn convert_messages(chat: &ChatRequest<'_>) -> Result<(Option<String>, Vec<Turn>), ApiError> {
    let mut system: Vec<String> = Vec::new();
    let mut turns: Vec<Turn> = Vec::new();
    for message in chat.messages() {
        let message = message?;
        let (i, content) = (message.index, message.content());
        match message.role {
            Role::System => {
                let text = plain_text(content, i)?;
                if !text.is_empty() {
                    system.push(text);
                }
            }
            Role::User => push_turn(&mut turns, "user", user_content(content, i)?),
            Role::Assistant => {
                let blocks = message.assistant_blocks(
                    "Anthropic",
                    text_block,
                    |id, name, input| json!({"type": "tool_use", "id": id, "name": name, "input": input}),
                )?;
                if !blocks.is_empty() {
                    push_turn(&mut turns, "assistant", Content::Blocks(blocks));
                }
            }
            Role::Tool => {
                let result = json!({
                    "type": "tool_result",
                    "tool_use_id": message.tool_call_id()?,
                    "content": plain_text(content, i)?,
                });
                push_turn(&mut turns, "user", Content::Blocks(vec![result]));
            }
            Role::Other(role) => return Err(message.unsupported_role(role, "Anthropic")),
        }
    }
    if turns.is_empty() {
        return Err(bad_message(
            "'messages' must contain at least one user or assistant message.".into(),
        ));
    }
    let system = (!system.is_empty()).then(|| system.join("\n\n"));
    Ok((system, turns))
}

fn convert_tool(tool: &Tool<'_>) -> Value {
    let mut out = Map::new();
    out.insert("name".into(), Value::String(tool.name.to_string()));
    if let Some(d) = tool.description {
        out.insert("description".into(), Value::String(d.to_string()));
    }
    let schema = match tool.parameters {
        None => json!({"type": "object", "properties": {}}),
        Some(p) => p.clone(),
    };
    out.insert("input_schema".into(), schema);
    Value::Object(out)
}

fn convert_tool_choice(choice: ToolChoice<'_>) -> Map<String, Value> {
    let mut out = Map::new();
    let kind = match choice {
        ToolChoice::Auto => "auto",
        ToolChoice::None => "none",
        ToolChoice::Required => "any",
        ToolChoice::Named(name) => {
            out.insert("name".into(), Value::String(name.to_string()));
            "tool"
        }
    };
    out.insert("type".into(), Value::String(kind.to_string()));
    out
}

#[derive(Serialize)]
struct MessagesRequest<'a> {
    model: &'a str,
    max_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<String>,
    messages: Vec<TurnOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<&'a Value>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    stop_sequences: &'a [&'a str],
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<Value>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<Map<String, Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    thinking: Option<Value>,
}

#[derive(Serialize)]
struct TurnOut {
    role: &'static str,
    content: Value,
}

/// OpenAI chat completions request body -> Anthropic Messages request body.
pub fn chat_request_to_messages(
    openai_body: &[u8],
    upstream_model: &str,
    default_max_tokens: u64,
) -> Result<(Vec<u8>, ChatRequestInfo), ApiError> {
    let req = crate::translate::request_object(openai_body)?;
    let chat = ChatRequest::parse(&req)?;
    let body = messages_request(&chat, upstream_model, default_max_tokens)?;
    Ok((
        body,
        ChatRequestInfo {
            stream: chat.stream,
            include_usage: chat.include_usage,
        },
    ))
}

/// The pivot request as an Anthropic Messages request body.
pub fn messages_request(
    chat: &ChatRequest<'_>,
    upstream_model: &str,
    default_max_tokens: u64,
) -> Result<Vec<u8>, ApiError> {
    match chat.n {
        Some(n) if n > 1 => {
            return Err(unsupported(
                "n",
                "The Anthropic provider does not support 'n' greater than 1 through this \
                 gateway; send one request per choice."
                    .into(),
            ))
        }
        _ => {}
    }
    if let Some(format @ (ResponseFormat::JsonObject | ResponseFormat::JsonSchema(_))) =
        chat.response_format
    {
        return Err(unsupported(
            "response_format",
            format!(
                "The Anthropic provider does not support 'response_format' of type \
                 '{}' through this gateway; describe the format in the prompt or \
                 use a tool with an input schema instead.",
                format.kind()
            ),
        ));
    }
    let (system, turns) = convert_messages(chat)?;

    let mut max_tokens = chat.max_tokens.unwrap_or(default_max_tokens);
    let thinking_budget = chat.reasoning_effort.and_then(|effort| {
        THINKING_BUDGETS
            .iter()
            .find(|(name, _)| *name == effort.name())
            .map(|(_, budget)| *budget)
    });
    let thinking = thinking_budget.map(|budget| {
        // Anthropic requires max_tokens > budget_tokens.
        if budget >= max_tokens {
            max_tokens = budget.saturating_add(THINKING_HEADROOM);
        }
        json!({"type": "enabled", "budget_tokens": budget})
    });

    let metadata = match chat.optional("user") {
        None => None,
        Some(Value::String(user)) => Some(json!({"user_id": user})),
        Some(other) => return Err(invalid_type("user", "a string", other)),
    };

    let tools: Vec<Value> = chat.tools.iter().map(convert_tool).collect();
    let mut tool_choice = chat.tool_choice.map(convert_tool_choice);
    if !tools.is_empty() && chat.parallel_tool_calls == Some(false) {
        let choice = tool_choice.get_or_insert_with(|| {
            let mut auto = Map::new();
            auto.insert("type".into(), Value::String("auto".into()));
            auto
        });
        if choice.get("type").and_then(Value::as_str) != Some("none") {
            choice.insert("disable_parallel_tool_use".into(), Value::Bool(true));
        }
    }

    let out = MessagesRequest {
        model: upstream_model,
        max_tokens,
        system,
        messages: turns
            .into_iter()
            .map(|(role, content)| TurnOut {
                role,
                content: content.into_value(),
            })
            .collect(),
        temperature: chat.temperature,
        top_p: chat.top_p,
        stop_sequences: &chat.stop,
        stream: chat.stream,
        metadata,
        tools,
        tool_choice,
        thinking,
    };
    request_body(&out, "Anthropic")
}

// ---------------------------------------------------------------------------
// Responses: Anthropic -> OpenAI
// ---------------------------------------------------------------------------

/// Anthropic's own usage fields as reported.
#[derive(Debug, Clone, Copy, Default)]
struct RawUsage {
    input: u64,
    output: u64,
    cache_read: u64,
    cache_creation: u64,
}

impl RawUsage {
    /// Takes the counts present in an Anthropic `usage` object.
    fn update(&mut self, usage: &Value) {
        let read = |name: &str| usage.get(name).and_then(Value::as_u64);
        if let Some(n) = read("input_tokens") {
            self.input = n;
        }
        if let Some(n) = read("output_tokens") {
            self.output = n;
        }
        if let Some(n) = read("cache_read_input_tokens") {
            self.cache_read = n;
        }
        if let Some(n) = read("cache_creation_input_tokens") {
            self.cache_creation = n;
        }
    }

    fn prompt_tokens(&self) -> u64 {
        self.input
            .saturating_add(self.cache_read)
            .saturating_add(self.cache_creation)
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

/// Anthropic `stop_reason` -> OpenAI `finish_reason`.
fn finish_reason(stop_reason: Option<&str>) -> &'static str {
    match stop_reason {
        Some("max_tokens") => "length",
        Some("tool_use") => "tool_calls",
        Some("refusal") => "content_filter",
        // end_turn, stop_sequence, pause_turn, unknown or absent.
        _ => "stop",
    }
}

/// Anthropic Messages (non-streamed) response -> OpenAI chat.completion JSON.
pub fn messages_response_to_chat(anthropic_body: &[u8], created: u64) -> Result<Vec<u8>, String> {
    let v: Value = from_slice_lossy(anthropic_body)
        .map_err(|e| format!("the Anthropic response is not valid JSON: {e}"))?;
    let blocks = v
        .get("content")
        .and_then(Value::as_array)
        .ok_or("the Anthropic response has no 'content' array")?;
    let mut text: Option<String> = None;
    let mut reasoning: Option<String> = None;
    let mut tool_calls = Vec::new();
    for block in blocks {
        match block.get("type").and_then(Value::as_str) {
            Some("text") => {
                let t = block
                    .get("text")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                text.get_or_insert_with(String::new).push_str(t);
            }
            Some("thinking") => {
                let t = block
                    .get("thinking")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                reasoning.get_or_insert_with(String::new).push_str(t);
            }
            Some("tool_use") => {
                let empty = Value::Object(Map::new());
                let input = block.get("input").unwrap_or(&empty);
                let arguments = serde_json::to_string(input)
                    .map_err(|e| format!("could not serialize tool input: {e}"))?;
                tool_calls.push(ToolCall {
                    id: block.get("id").and_then(Value::as_str).unwrap_or_default(),
                    kind: "function",
                    function: FunctionCall {
                        name: block
                            .get("name")
                            .and_then(Value::as_str)
                            .unwrap_or_default(),
                        arguments,
                    },
                });
            }
            // redacted_thinking, server tool blocks: nothing OpenAI can show.
            _ => {}
        }
    }
    let mut usage = RawUsage::default();
    if let Some(u) = v.get("usage") {
        usage.update(u);
    }
    let completion = ChatCompletion {
        id: v.get("id").and_then(Value::as_str).unwrap_or_default(),
        object: "chat.completion",
        created,
        model: v.get("model").and_then(Value::as_str).unwrap_or_default(),
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
            finish_reason: finish_reason(v.get("stop_reason").and_then(Value::as_str)),
        }],
        usage: usage.chat(),
    };
    serde_json::to_vec(&completion).map_err(|e| format!("could not serialize the answer: {e}"))
}

/// Anthropic HTTP status -> the status the OpenAI caller gets (529 overloaded -> 503; others unchanged).
pub fn caller_status(anthropic_status: u16) -> u16 {
    match anthropic_status {
        529 => 503,
        other => other,
    }
}

/// Anthropic error `type` -> OpenAI error `type` and `code`.
fn map_error_type(kind: &str) -> Option<(&'static str, Option<&'static str>)> {
    Some(match kind {
        "invalid_request_error" => ("invalid_request_error", None),
        "authentication_error" => ("authentication_error", None),
        "permission_error" => ("permission_error", None),
        "not_found_error" => ("not_found_error", None),
        "rate_limit_error" => ("rate_limit_error", Some("rate_limit_exceeded")),
        "overloaded_error" => ("server_error", Some("overloaded")),
        "api_error" => ("server_error", None),
        "request_too_large" => ("invalid_request_error", Some("request_too_large")),
        _ => return None,
    })
}

/// Anthropic error body {"type":"error","error":{"type","message"}} -> OpenAI error JSON
/// {"error":{"message","type","param":null,"code"}}. Non-JSON bodies: quote the text (max 512 bytes).
pub fn messages_error_to_chat(status: u16, body: &[u8]) -> Vec<u8> {
    let parsed: Option<Value> = from_slice_lossy(body).ok();
    let mapped = parsed
        .as_ref()
        .and_then(|v| v.pointer("/error/type"))
        .and_then(Value::as_str)
        .and_then(map_error_type);
    let (kind, code) = mapped.unwrap_or((error_type_for_status(caller_status(status)), None));
    // Anthropic's own shape, or what a proxy in front of it says.
    let message = parsed
        .as_ref()
        .and_then(crate::core::api_error::message_from_json)
        .unwrap_or_else(|| {
            let text = quoted(body);
            if text.is_empty() {
                format!("The Anthropic API returned HTTP {status} with no details.")
            } else {
                format!("The Anthropic API returned HTTP {status}: {text}")
            }
        });
    ApiError::new(status, kind, code, message).body()
}

// ---------------------------------------------------------------------------
// Streaming: Anthropic SSE -> OpenAI chat.completion.chunk SSE
// ---------------------------------------------------------------------------

/// Streaming: Anthropic SSE bytes in, OpenAI chat.completion.chunk SSE bytes out.
pub type MessagesStreamToChat = EventStream<SseParser, MessagesEvents>;

impl MessagesStreamToChat {
    pub fn new(include_usage: bool, created: u64) -> Self {
        EventStream::reading(
            SseParser::default(),
            MessagesEvents {
                chunks: PivotChunks::new(include_usage, "", created),
                tool_blocks: Vec::new(),
                usage: RawUsage::default(),
                usage_seen: false,
            },
        )
    }
}

/// The per-event mapping of [`MessagesStreamToChat`]: complete at
/// `message_stop`, failed at an `error` event.
pub struct MessagesEvents {
    chunks: PivotChunks,
    /// Anthropic content-block index -> OpenAI tool-call index.
    tool_blocks: Vec<(u64, usize)>,
    usage: RawUsage,
    usage_seen: bool,
}

impl EventMapping for MessagesEvents {
    type Event = SseEvent;
    const UPSTREAM: &'static str = "Anthropic";

    fn on_event(&mut self, event: SseEvent, out: &mut Vec<u8>) -> Result<Flow, StreamFault> {
        let parsed: Option<Value> = from_str_lossy(&event.data).ok();
        let kind = parsed
            .as_ref()
            .and_then(|v| v.get("type"))
            .and_then(Value::as_str)
            .or(event.event.as_deref())
            .unwrap_or_default();
        if kind == "error" {
            write_data(out, &messages_error_to_chat(500, event.data.as_bytes()));
            return Ok(Flow::Ended);
        }
        let Some(v) = parsed.as_ref() else {
            return Err(StreamFault::Corrupt);
        };
        Ok(self.handle(kind, v, out))
    }

    fn write_error(&mut self, error: &ApiError, out: &mut Vec<u8>) {
        write_data(out, &error.body());
    }

    /// Token counts seen so far, once the upstream has reported any.
    fn usage(&self) -> Option<Usage> {
        self.usage_seen.then(|| self.usage.usage())
    }
}

impl MessagesEvents {
    fn emit(&self, out: &mut Vec<u8>, delta: Delta<'_>, finish: Option<&'static str>) {
        self.chunks.delta(out, 0, delta, finish);
    }

    fn record_usage(&mut self, usage: Option<&Value>) {
        if let Some(u) = usage.filter(|u| u.is_object()) {
            self.usage.update(u);
            self.usage_seen = true;
        }
    }

    fn handle(&mut self, kind: &str, v: &Value, out: &mut Vec<u8>) -> Flow {
        match kind {
            "message_start" => {
                let message = v.get("message");
                let text = |name: &str| {
                    message
                        .and_then(|m| m.get(name))
                        .and_then(Value::as_str)
                        .map(str::to_string)
                };
                if let Some(id) = text("id") {
                    self.chunks.id = id;
                }
                if let Some(model) = text("model") {
                    self.chunks.model = model;
                }
                self.record_usage(message.and_then(|m| m.get("usage")));
                let delta = Delta {
                    role: Some("assistant"),
                    content: Some(""),
                    ..Delta::default()
                };
                self.emit(out, delta, None);
            }
            "content_block_start" => {
                let block = v.get("content_block");
                let block_type = block.and_then(|b| b.get("type")).and_then(Value::as_str);
                if block_type != Some("tool_use") {
                    return Flow::Open;
                }
                let index = v.get("index").and_then(Value::as_u64).unwrap_or_default();
                let k = self.tool_blocks.len();
                self.tool_blocks.push((index, k));
                let field = |name: &str| {
                    block
                        .and_then(|b| b.get(name))
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                };
                let call = ToolCallDelta {
                    index: k,
                    id: Some(field("id")),
                    kind: Some("function"),
                    function: FunctionDelta {
                        name: Some(field("name")),
                        arguments: "",
                    },
                    extra_content: None,
                };
                let delta = Delta {
                    tool_calls: Some([call]),
                    ..Delta::default()
                };
                self.emit(out, delta, None);
            }
            "content_block_delta" => {
                let Some(d) = v.get("delta") else {
                    return Flow::Open;
                };
                let text = |name: &str| d.get(name).and_then(Value::as_str);
                match d.get("type").and_then(Value::as_str) {
                    Some("text_delta") => {
                        let delta = Delta {
                            content: Some(text("text").unwrap_or_default()),
                            ..Delta::default()
                        };
                        self.emit(out, delta, None);
                    }
                    Some("thinking_delta") => {
                        let delta = Delta {
                            reasoning_content: Some(text("thinking").unwrap_or_default()),
                            ..Delta::default()
                        };
                        self.emit(out, delta, None);
                    }
                    Some("input_json_delta") => {
                        let index = v.get("index").and_then(Value::as_u64);
                        let k = self
                            .tool_blocks
                            .iter()
                            .find(|(block, _)| Some(*block) == index)
                            .map(|(_, k)| *k);
                        let Some(k) = k else {
                            log::warn!(
                                "ignoring tool input for an unknown Anthropic block {index:?}"
                            );
                            return Flow::Open;
                        };
                        let call = ToolCallDelta {
                            index: k,
                            id: None,
                            kind: None,
                            function: FunctionDelta {
                                name: None,
                                arguments: text("partial_json").unwrap_or_default(),
                            },
                            extra_content: None,
                        };
                        let delta = Delta {
                            tool_calls: Some([call]),
                            ..Delta::default()
                        };
                        self.emit(out, delta, None);
                    }
                    // signature_delta, citations_delta, ...: nothing to show.
                    _ => {}
                }
            }
            "message_delta" => {
                self.record_usage(v.get("usage"));
                let stop_reason = v.pointer("/delta/stop_reason").and_then(Value::as_str);
                self.emit(out, Delta::default(), Some(finish_reason(stop_reason)));
            }
            "message_stop" => {
                self.chunks.end(out, self.usage.chat());
                return Flow::Ended;
            }
            // content_block_stop, ping, and event types added later.
            _ => {}
        }
        Flow::Open
    }
}

// ---------------------------------------------------------------------------

/// Anthropic Messages (also on Vertex AI).
pub struct Anthropic;
impl ProviderTranslator for Anthropic {
    fn request_from_pivot(
        &self,
        chat: &ChatRequest<'_>,
        upstream: &Upstream<'_>,
    ) -> Result<Vec<u8>, ApiError> {
        messages_request(chat, upstream.model, upstream.default_max_tokens)
    }
    fn answer_to_pivot(&self, body: &[u8], _model: &str, created: u64) -> Result<Vec<u8>, String> {
        messages_response_to_chat(body, created)
    }
    fn caller_status(&self, status: u16, _error_type: Option<&str>) -> u16 {
        caller_status(status)
    }
    fn error_to_pivot(&self, status: u16, _error_type: Option<&str>, body: &[u8]) -> Vec<u8> {
        messages_error_to_chat(status, body)
    }
    fn stream_to_pivot(
        &self,
        include_usage: bool,
        _model: &str,
        created: u64,
    ) -> Box<dyn StreamTranslator> {
        Box::new(MessagesStreamToChat::new(include_usage, created))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const TEXT_STREAM: &str = include_str!("../../../tests/fixtures/anthropic/text_stream.sse");
    const TOOL_STREAM: &str = include_str!("../../../tests/fixtures/anthropic/tool_stream.sse");
    const TOOL_RESPONSE: &str =
        include_str!("../../../tests/fixtures/anthropic/response_tool_use.json");
    const CREATED: u64 = 1_700_000_000;

    // ----- requests --------------------------------------------------------

    fn translate_with(req: &Value, default_max_tokens: u64) -> (Value, ChatRequestInfo) {
        let body = serde_json::to_vec(req).unwrap();
        let (out, info) =
            chat_request_to_messages(&body, "claude-sonnet-4-5", default_max_tokens).unwrap();
        (serde_json::from_slice(&out).unwrap(), info)
    }

    fn translate(req: &Value) -> Value {
        translate_with(req, 1024).0
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
                json!({"model": "claude-sonnet-4-5", "max_tokens": 1024,
                       "messages": [{"role": "user", "content": "Hello"}], "stream": false}),
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
                    {"role": "system", "content": "Be kind."},
                    {"role": "user", "content": "Encore"}
                ])),
                json!({"model": "claude-sonnet-4-5", "max_tokens": 1024,
                       "system": "You are terse.\n\nAnswer in French. Always.\n\nBe kind.",
                       "messages": [
                           {"role": "user", "content": [
                               {"type": "text", "text": "Hi"},
                               {"type": "text", "text": "there"}]},
                           {"role": "assistant", "content": [{"type": "text", "text": "Bonjour"}]},
                           {"role": "user", "content": "Encore"}],
                       "stream": false}),
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
                       "response_format": {"type": "text"}}),
                json!({"model": "claude-sonnet-4-5", "max_tokens": 200,
                       "messages": [
                           {"role": "user", "content": "What is 2+2?"},
                           {"role": "assistant", "content": [{"type": "text", "text": "4"}]},
                           {"role": "user", "content": "And times 3?"}],
                       "temperature": 0.2, "top_p": 0.9, "stop_sequences": ["END"],
                       "stream": true, "metadata": {"user_id": "user-123"}}),
            ),
            (
                "stop array; max_completion_tokens wins over max_tokens",
                json!({"model": "claude", "messages": [{"role": "user", "content": "Count"}],
                       "stop": ["\n\nHuman:", "STOP"], "max_completion_tokens": 300,
                       "max_tokens": 50}),
                json!({"model": "claude-sonnet-4-5", "max_tokens": 300,
                       "messages": [{"role": "user", "content": "Count"}],
                       "stop_sequences": ["\n\nHuman:", "STOP"], "stream": false}),
            ),
            (
                "images: base64 data URL and https URL",
                with_messages(json!([{"role": "user", "content": [
                    {"type": "text", "text": "What is in these?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUg=="}},
                    {"type": "image_url", "image_url": {"url": "https://upload.wikimedia.org/cat.jpg", "detail": "high"}}
                ]}])),
                json!({"model": "claude-sonnet-4-5", "max_tokens": 1024, "stream": false,
                "messages": [{"role": "user", "content": [
                    {"type": "text", "text": "What is in these?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                 "data": "iVBORw0KGgoAAAANSUhEUg=="}},
                    {"type": "image", "source": {"type": "url",
                                                 "url": "https://upload.wikimedia.org/cat.jpg"}}
                ]}]}),
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
                       "tool_choice": "required"}),
                json!({"model": "claude-sonnet-4-5", "max_tokens": 1024, "stream": false,
                       "messages": [
                           {"role": "user", "content": "Weather in Paris and the time there?"},
                           {"role": "assistant", "content": [
                               {"type": "tool_use", "id": "call_1", "name": "get_weather",
                                "input": {"location": "Paris"}},
                               {"type": "tool_use", "id": "call_2", "name": "get_time", "input": {}}]},
                           {"role": "user", "content": [
                               {"type": "tool_result", "tool_use_id": "call_1", "content": "18°C, cloudy"},
                               {"type": "tool_result", "tool_use_id": "call_2", "content": "14:05 CET"},
                               {"type": "text", "text": "Thanks! Summarise."}]}],
                       "tools": [
                           {"name": "get_weather", "description": "Current weather",
                            "input_schema": weather_schema},
                           {"name": "get_time", "input_schema": {"type": "object", "properties": {}}}],
                       "tool_choice": {"type": "any"}}),
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
                     "tool_calls": [{"id": "toolu_9", "type": "function", "function":
                         {"name": "lookup", "arguments": "{\"q\": [1, {\"x\": null}]}"}}]},
                    {"role": "tool", "tool_call_id": "toolu_9", "content": "found"}
                ])),
                json!({"model": "claude-sonnet-4-5", "max_tokens": 1024, "stream": false,
                       "messages": [
                           {"role": "user", "content": [
                               {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                           {"role": "assistant", "content": [
                               {"type": "text", "text": "Part one."},
                               {"type": "text", "text": "Let me check."},
                               {"type": "tool_use", "id": "toolu_9", "name": "lookup",
                                "input": {"q": [1, {"x": null}]}}]},
                           {"role": "user", "content": [
                               {"type": "tool_result", "tool_use_id": "toolu_9", "content": "found"}]}]}),
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
            let (out, info) = translate_with(&req, 1024);
            assert_eq!(
                info,
                ChatRequestInfo {
                    stream,
                    include_usage
                },
                "{extra}"
            );
            assert_eq!(out["stream"], json!(stream), "{extra}");
            assert!(out.get("stream_options").is_none(), "{extra}");
        }
    }

    #[test]
    fn default_max_tokens_applies_only_when_none_given() {
        let req = with_messages(json!([{"role": "user", "content": "x"}]));
        assert_eq!(translate_with(&req, 4096).0["max_tokens"], 4096);
        assert_eq!(translate_with(&req, 333).0["max_tokens"], 333);
        let mut given = req.clone();
        given["max_tokens"] = json!(77);
        assert_eq!(translate_with(&given, 4096).0["max_tokens"], 77);
        given["max_tokens"] = Value::Null;
        assert_eq!(translate_with(&given, 4096).0["max_tokens"], 4096);
    }

    #[test]
    fn tool_choice_table() {
        let tools = json!([{"type": "function", "function": {"name": "get_weather"}}]);
        let absent = Value::Null;
        let table: Vec<(&str, Value, Value)> = vec![
            (
                "auto",
                json!({"tool_choice": "auto"}),
                json!({"type": "auto"}),
            ),
            (
                "none",
                json!({"tool_choice": "none"}),
                json!({"type": "none"}),
            ),
            (
                "required",
                json!({"tool_choice": "required"}),
                json!({"type": "any"}),
            ),
            (
                "named function",
                json!({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
                json!({"type": "tool", "name": "get_weather"}),
            ),
            ("absent", json!({}), absent.clone()),
            (
                "parallel off, no choice",
                json!({"parallel_tool_calls": false}),
                json!({"type": "auto", "disable_parallel_tool_use": true}),
            ),
            (
                "parallel off, required",
                json!({"parallel_tool_calls": false, "tool_choice": "required"}),
                json!({"type": "any", "disable_parallel_tool_use": true}),
            ),
            (
                "parallel off, named",
                json!({"parallel_tool_calls": false, "tool_choice":
                    {"type": "function", "function": {"name": "get_weather"}}}),
                json!({"type": "tool", "name": "get_weather", "disable_parallel_tool_use": true}),
            ),
            (
                "parallel off, none",
                json!({"parallel_tool_calls": false, "tool_choice": "none"}),
                json!({"type": "none"}),
            ),
            (
                "parallel on",
                json!({"parallel_tool_calls": true}),
                absent.clone(),
            ),
        ];
        for (name, extra, expected) in table {
            let mut req = with_messages(json!([{"role": "user", "content": "x"}]));
            req["tools"] = tools.clone();
            req.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let out = translate(&req);
            assert_eq!(
                out.get("tool_choice").cloned().unwrap_or(Value::Null),
                expected,
                "{name}"
            );
            assert_eq!(out["tools"][0]["name"], "get_weather", "{name}");
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
            let out = translate(&req);
            assert!(out.get("tool_choice").is_none(), "{extra}");
            assert!(out.get("tools").is_none(), "{extra}");
        }
    }

    #[test]
    fn reasoning_effort_table() {
        // (effort, max_tokens given, expected budget, expected max_tokens)
        let table: &[(&str, Option<u64>, Option<u64>, u64)] = &[
            ("low", Some(8000), Some(1024), 8000),
            ("low", None, Some(1024), 2048),
            ("medium", Some(4096), Some(4096), 5120),
            ("medium", Some(4097), Some(4096), 4097),
            ("high", None, Some(16384), 17408),
            ("high", Some(32000), Some(16384), 32000),
            ("minimal", Some(500), None, 500),
            ("none", None, None, 1024),
        ];
        for (effort, given, budget, max_tokens) in table {
            let mut req = with_messages(json!([{"role": "user", "content": "think"}]));
            req["reasoning_effort"] = json!(effort);
            if let Some(n) = given {
                req["max_tokens"] = json!(n);
            }
            let out = translate(&req);
            assert_eq!(out["max_tokens"], json!(max_tokens), "{effort} {given:?}");
            match budget {
                Some(b) => assert_eq!(
                    out["thinking"],
                    json!({"type": "enabled", "budget_tokens": b}),
                    "{effort}"
                ),
                None => assert!(out.get("thinking").is_none(), "{effort}"),
            }
        }
    }

    #[test]
    fn request_error_table() {
        let user = r#"[{"role":"user","content":"x"}]"#;
        let with = |extra: &str| format!(r#"{{"model":"m","messages":{user},{extra}}}"#);
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
                "empty messages",
                r#"{"model":"m","messages":[]}"#.into(),
                Some("messages"),
                Some("invalid_value"),
            ),
            (
                "message not an object",
                r#"{"model":"m","messages":["hi"]}"#.into(),
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
                with(
                    r#""response_format":{"type":"json_schema","json_schema":{"name":"x","schema":{"type":"object"}}}"#,
                ),
                Some("response_format"),
                Some("unsupported_parameter"),
            ),
            ("n > 1", with(r#""n":2"#), Some("n"), Some("unsupported_parameter")),
            (
                "max_tokens not a number",
                with(r#""max_tokens":"ten""#),
                Some("max_tokens"),
                Some("invalid_type"),
            ),
            (
                "max_completion_tokens zero",
                with(r#""max_completion_tokens":0"#),
                Some("max_completion_tokens"),
                Some("invalid_value"),
            ),
            (
                "unknown reasoning effort",
                with(r#""reasoning_effort":"extreme""#),
                Some("reasoning_effort"),
                Some("invalid_value"),
            ),
            (
                "stop with a number",
                with(r#""stop":["a",3]"#),
                Some("stop"),
                Some("invalid_type"),
            ),
            (
                "temperature as a string",
                with(r#""temperature":"hot""#),
                Some("temperature"),
                Some("invalid_type"),
            ),
            (
                "tool of another type",
                with(r#""tools":[{"type":"web_search"}]"#),
                Some("tools"),
                Some("invalid_value"),
            ),
            (
                "tool_choice unknown string",
                with(r#""tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":"sometimes""#),
                Some("tool_choice"),
                Some("invalid_value"),
            ),
            (
                "tool_choice required without tools",
                with(r#""tool_choice":"required""#),
                Some("tool_choice"),
                Some("invalid_value"),
            ),
        ];
        for (name, body, param, code) in table {
            let err = chat_request_to_messages(body.as_bytes(), "claude", 1024).expect_err(name);
            assert_eq!(err.status, 400, "{name}");
            assert_eq!(err.kind, "invalid_request_error", "{name}");
            assert_eq!(err.param, param, "{name}");
            assert_eq!(err.code, code, "{name}: {}", err.message);
            assert!(!err.message.is_empty(), "{name}");
        }
    }

    #[test]
    fn unsupported_parameters_name_the_anthropic_provider() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_object"}}"#;
        let err = chat_request_to_messages(body, "claude", 1024).unwrap_err();
        assert!(err.message.contains("Anthropic"), "{}", err.message);
        assert!(err.message.contains("response_format"), "{}", err.message);
        let v: Value = serde_json::from_slice(&err.body()).unwrap();
        assert_eq!(v["error"]["code"], "unsupported_parameter");
        assert_eq!(v["error"]["param"], "response_format");

        let bad_args = br#"{"model":"m","messages":[{"role":"user","content":"x"},{"role":"assistant","tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"not json"}}]}]}"#;
        let err = chat_request_to_messages(bad_args, "claude", 1024).unwrap_err();
        assert!(
            err.message.contains("messages[1].tool_calls[0]"),
            "{}",
            err.message
        );
    }

    // ----- non-streamed responses -----------------------------------------

    fn respond(body: &Value) -> Value {
        let out = messages_response_to_chat(&serde_json::to_vec(body).unwrap(), CREATED).unwrap();
        serde_json::from_slice(&out).unwrap()
    }

    #[test]
    fn text_response_maps_every_field() {
        let anthropic = json!({
            "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF", "type": "message", "role": "assistant",
            "model": "claude-haiku-4-5", "content": [
                {"type": "text", "text": "Hi "}, {"type": "text", "text": "there."}],
            "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {"input_tokens": 12, "output_tokens": 6}
        });
        assert_eq!(
            respond(&anthropic),
            json!({
                "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF", "object": "chat.completion",
                "created": CREATED, "model": "claude-haiku-4-5",
                "choices": [{"index": 0,
                             "message": {"role": "assistant", "content": "Hi there.", "refusal": null},
                             "logprobs": null, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18,
                          "prompt_tokens_details": {"cached_tokens": 0}}
            })
        );
    }

    #[test]
    fn tool_use_response_with_thinking_and_cache_usage() {
        let anthropic: Value = serde_json::from_str(TOOL_RESPONSE).unwrap();
        let out = respond(&anthropic);
        let message = &out["choices"][0]["message"];
        assert_eq!(message["content"], "I'll check both cities.");
        assert_eq!(
            message["reasoning_content"],
            "Two independent lookups; call both tools."
        );
        assert_eq!(out["choices"][0]["finish_reason"], "tool_calls");
        let calls = message["tool_calls"].as_array().unwrap();
        let uses: Vec<&Value> = anthropic["content"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| b["type"] == "tool_use")
            .collect();
        assert_eq!(calls.len(), 2);
        for (call, block) in calls.iter().zip(uses) {
            assert_eq!(call["id"], block["id"]);
            assert_eq!(call["type"], "function");
            assert_eq!(call["function"]["name"], block["name"]);
            let arguments = call["function"]["arguments"].as_str().unwrap();
            let parsed: Value = serde_json::from_str(arguments).unwrap();
            assert_eq!(parsed, block["input"]);
        }
        assert_eq!(
            out["usage"],
            json!({"prompt_tokens": 4143, "completion_tokens": 503, "total_tokens": 4646,
                   "prompt_tokens_details": {"cached_tokens": 1800}})
        );
    }

    #[test]
    fn response_without_text_has_null_content_and_no_optional_keys() {
        let only_tool = json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude",
            "content": [{"type": "tool_use", "id": "toolu_1", "name": "ping", "input": {}}],
            "stop_reason": "tool_use", "usage": {"input_tokens": 1, "output_tokens": 1}
        });
        let out = respond(&only_tool);
        let message = &out["choices"][0]["message"];
        assert!(message["content"].is_null());
        assert_eq!(message["tool_calls"][0]["function"]["arguments"], "{}");
        assert!(message.get("reasoning_content").is_none());

        let empty = json!({"id": "msg_2", "type": "message", "role": "assistant",
                           "model": "claude", "content": [], "stop_reason": "end_turn",
                           "usage": {"input_tokens": 3, "output_tokens": 0}});
        let out = respond(&empty);
        let message = &out["choices"][0]["message"];
        assert!(message.as_object().unwrap().contains_key("content"));
        assert!(message["content"].is_null());
        assert!(message.get("tool_calls").is_none());
    }

    #[test]
    fn every_stop_reason_maps() {
        let table = [
            (json!("end_turn"), "stop"),
            (json!("stop_sequence"), "stop"),
            (json!("max_tokens"), "length"),
            (json!("tool_use"), "tool_calls"),
            (json!("refusal"), "content_filter"),
            (json!("pause_turn"), "stop"),
            (json!("model_context_window_exceeded"), "stop"),
            (Value::Null, "stop"),
        ];
        for (stop_reason, finish) in table {
            let body = json!({"id": "m", "type": "message", "role": "assistant", "model": "c",
                              "content": [{"type": "text", "text": "x"}],
                              "stop_reason": stop_reason,
                              "usage": {"input_tokens": 1, "output_tokens": 1}});
            assert_eq!(
                respond(&body)["choices"][0]["finish_reason"],
                finish,
                "{stop_reason}"
            );
        }
    }

    #[test]
    fn unreadable_responses_are_errors() {
        for body in [&b"not json"[..], b"[]", br#"{"type":"message"}"#, b""] {
            assert!(messages_response_to_chat(body, CREATED).is_err());
        }
    }

    // ----- errors -----------------------------------------------------------

    #[test]
    fn error_table() {
        let anthropic = |kind: &str, message: &str| {
            json!({"type": "error", "error": {"type": kind, "message": message}}).to_string()
        };
        // (status, body, type, code, message must contain)
        let table: Vec<(u16, String, &str, Value, &str)> = vec![
            (
                400,
                anthropic("invalid_request_error", "max_tokens: Field required"),
                "invalid_request_error",
                Value::Null,
                "max_tokens: Field required",
            ),
            (
                401,
                anthropic("authentication_error", "invalid x-api-key"),
                "authentication_error",
                Value::Null,
                "invalid x-api-key",
            ),
            (
                403,
                anthropic("permission_error", "no access"),
                "permission_error",
                Value::Null,
                "no access",
            ),
            (
                404,
                anthropic("not_found_error", "model: claude-x"),
                "not_found_error",
                Value::Null,
                "model: claude-x",
            ),
            (
                429,
                anthropic("rate_limit_error", "slow down"),
                "rate_limit_error",
                json!("rate_limit_exceeded"),
                "slow down",
            ),
            (
                529,
                anthropic("overloaded_error", "Overloaded"),
                "server_error",
                json!("overloaded"),
                "Overloaded",
            ),
            (
                500,
                anthropic("api_error", "Internal server error"),
                "server_error",
                Value::Null,
                "Internal server error",
            ),
            (
                413,
                anthropic("request_too_large", "Request exceeds the maximum size"),
                "invalid_request_error",
                json!("request_too_large"),
                "maximum size",
            ),
            (
                402,
                anthropic("billing_error", "Your credit balance is too low"),
                "invalid_request_error",
                Value::Null,
                "credit balance",
            ),
            (
                502,
                "<html><body>Bad Gateway</body></html>".into(),
                "server_error",
                Value::Null,
                "HTTP 502: <html><body>Bad Gateway",
            ),
            (
                504,
                String::new(),
                "server_error",
                Value::Null,
                "no details",
            ),
            (
                529,
                "overloaded, try later".into(),
                "server_error",
                Value::Null,
                "overloaded, try later",
            ),
            (
                429,
                r#"{"message":"too many"}"#.into(),
                "rate_limit_error",
                Value::Null,
                "too many",
            ),
        ];
        for (status, body, kind, code, text) in table {
            let v: Value =
                serde_json::from_slice(&messages_error_to_chat(status, body.as_bytes())).unwrap();
            let error = v["error"].as_object().unwrap();
            assert_eq!(error.len(), 4, "{body}");
            assert_eq!(error["type"], kind, "{body}");
            assert_eq!(error["code"], code, "{body}");
            assert!(error["param"].is_null(), "{body}");
            let message = error["message"].as_str().unwrap();
            assert!(message.contains(text), "{message}");
        }
    }

    #[test]
    fn long_error_text_is_cut_at_a_character_boundary() {
        for body in ["x".repeat(10_000), "é".repeat(5_000), "👋".repeat(3_000)] {
            let v: Value =
                serde_json::from_slice(&messages_error_to_chat(500, body.as_bytes())).unwrap();
            let message = v["error"]["message"].as_str().unwrap();
            assert!(message.len() < 600, "{}", message.len());
            assert!(message.len() > 400, "{}", message.len());
            assert!(!message.contains('\u{FFFD}'));
        }
    }

    #[test]
    fn caller_status_table() {
        for (upstream, caller) in [
            (529, 503),
            (429, 429),
            (500, 500),
            (503, 503),
            (400, 400),
            (200, 200),
        ] {
            assert_eq!(caller_status(upstream), caller, "{upstream}");
        }
    }

    // ----- streaming ----------------------------------------------------------

    fn run_pieces(pieces: &[&[u8]], include_usage: bool) -> Vec<u8> {
        let mut t = MessagesStreamToChat::new(include_usage, CREATED);
        let mut out = Vec::new();
        for piece in pieces {
            t.push(piece, &mut out);
        }
        t.finish(&mut out);
        out
    }

    fn run(input: &[u8], include_usage: bool) -> Vec<u8> {
        run_pieces(&[input], include_usage)
    }

    /// The `data:` payloads of an OpenAI stream, checking the framing.
    fn data_events(out: &[u8]) -> Vec<String> {
        let text = std::str::from_utf8(out).unwrap();
        assert!(text.is_empty() || text.ends_with("\n\n"), "{text}");
        text.split_terminator("\n\n")
            .map(|e| e.strip_prefix("data: ").unwrap().to_string())
            .collect()
    }

    #[derive(Debug, Default)]
    struct Assembled {
        id: String,
        model: String,
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
        assert!(
            events.iter().filter(|e| *e == "[DONE]").count() <= 1,
            "[DONE] at most once"
        );
        for event in events.iter().filter(|e| *e != "[DONE]") {
            let v: Value = serde_json::from_str(event).unwrap();
            if v.get("error").is_some() {
                a.errors.push(v);
                continue;
            }
            assert_eq!(v["object"], "chat.completion.chunk");
            assert_eq!(v["created"], CREATED);
            a.id = v["id"].as_str().unwrap().to_string();
            a.model = v["model"].as_str().unwrap().to_string();
            assert_eq!(v.get("usage").is_some(), include_usage, "{event}");
            let choices = v["choices"].as_array().unwrap();
            if choices.is_empty() {
                assert!(v["usage"].is_object(), "{event}");
                a.usage_chunks.push(v["usage"].clone());
                continue;
            }
            if include_usage {
                assert!(v["usage"].is_null(), "{event}");
            }
            assert_eq!(choices.len(), 1);
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
        for include_usage in [false, true] {
            let out = assert_chunking_invariant(TEXT_STREAM.as_bytes(), include_usage);
            let a = assemble(&out, include_usage);
            assert_eq!(a.id, "msg_01XFDUDYJgAACzvnptvVoYEL");
            assert_eq!(a.model, "claude-sonnet-4-5-20250929");
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
            // The first chunk announces the role.
            let first: Value = serde_json::from_str(&data_events(&out)[0]).unwrap();
            assert_eq!(
                first["choices"][0]["delta"],
                json!({"role": "assistant", "content": ""})
            );
        }
    }

    #[test]
    fn parallel_tool_stream_reassembles_by_openai_index() {
        for include_usage in [false, true] {
            let out = assert_chunking_invariant(TOOL_STREAM.as_bytes(), include_usage);
            let a = assemble(&out, include_usage);
            assert_eq!(a.id, "msg_014p7gG3wDgGV9EUtLvnow3U");
            assert_eq!(a.content, "I'll look up the weather and the time in Paris.");
            // Indexes count tool calls from 0, not Anthropic's block indexes 1 and 2.
            assert_eq!(a.tools.keys().copied().collect::<Vec<_>>(), vec![0, 1]);
            let (id, name, args) = &a.tools[&0];
            assert_eq!(id, "toolu_01T1x1fJ34qAmk2tNTrN7Up6");
            assert_eq!(name, "get_weather");
            assert_eq!(
                serde_json::from_str::<Value>(args).unwrap(),
                json!({"location": "Paris, France", "unit": "celsius"})
            );
            let (id, name, args) = &a.tools[&1];
            assert_eq!(id, "toolu_01GsQd2bn9P1uSxRJ7N5gVpT");
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

    #[test]
    fn usage_chunk_comes_right_before_done() {
        let out = run(TEXT_STREAM.as_bytes(), true);
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
        let mut t = MessagesStreamToChat::new(false, CREATED);
        assert_eq!(t.usage(), None);
        let mut out = Vec::new();
        t.push(TOOL_STREAM.as_bytes(), &mut out);
        assert_eq!(
            t.usage(),
            Some(Usage {
                input_tokens: 840,
                output_tokens: 89,
                cached_input_tokens: 0,
                reasoning_tokens: 0
            })
        );
        let mut t = MessagesStreamToChat::new(true, CREATED);
        t.push(TEXT_STREAM.as_bytes(), &mut out);
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

    /// Output appears as soon as the upstream event producing it completes.
    #[test]
    fn nothing_is_held_back() {
        for fixture in [TEXT_STREAM, TOOL_STREAM] {
            let full = run(fixture.as_bytes(), true);
            let mut t = MessagesStreamToChat::new(true, CREATED);
            let mut out = Vec::new();
            for event in fixture.split_inclusive("\n\n") {
                let before = out.len();
                // Everything but the final blank line: not complete yet.
                let (body, end) = event.split_at(event.len() - 1);
                t.push(body.as_bytes(), &mut out);
                assert_eq!(out.len(), before, "output before the event ended: {event}");
                t.push(end.as_bytes(), &mut out);
                let data = event
                    .lines()
                    .find_map(|l| l.strip_prefix("data: "))
                    .unwrap();
                let v: Value = serde_json::from_str(data).unwrap();
                let silent = matches!(v["type"].as_str().unwrap(), "ping" | "content_block_stop")
                    || v["delta"]["type"] == "signature_delta"
                    || (v["type"] == "content_block_start"
                        && v["content_block"]["type"] != "tool_use");
                assert_eq!(out.len() == before, silent, "{event}");
                assert!(full.starts_with(&out));
            }
            assert_eq!(out, full);
        }
    }

    #[test]
    fn crlf_and_lone_cr_input_give_the_same_output() {
        for fixture in [TEXT_STREAM, TOOL_STREAM] {
            let lf = run(fixture.as_bytes(), true);
            for ending in ["\r\n", "\r"] {
                let converted = fixture.replace('\n', ending);
                assert_eq!(run(converted.as_bytes(), true), lf, "{ending:?}");
                let bytes: Vec<&[u8]> = converted.as_bytes().chunks(1).collect();
                assert_eq!(run_pieces(&bytes, true), lf, "{ending:?} byte by byte");
            }
        }
    }

    #[test]
    fn comment_lines_are_ignored() {
        let plain = run(TOOL_STREAM.as_bytes(), false);
        let commented = TOOL_STREAM
            .replace("event: ping\n", ": keep-alive\n\nevent: ping\n")
            .replace(
                "data: {\"type\":\"message_stop\"}",
                ": note\ndata: {\"type\":\"message_stop\"}",
            );
        assert_ne!(commented, TOOL_STREAM);
        assert_eq!(run(commented.as_bytes(), false), plain);
    }

    #[test]
    fn error_event_ends_the_stream_without_done() {
        let head: String = TEXT_STREAM.split_inclusive("\n\n").take(4).collect();
        let input = format!(
            "{head}event: error\ndata: {{\"type\": \"error\", \"error\": {{\"type\": \"overloaded_error\", \"message\": \"Overloaded\"}}}}\n\n\
             event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":1,\"delta\":{{\"type\":\"text_delta\",\"text\":\"late\"}}}}\n\n\
             event: message_stop\ndata: {{\"type\":\"message_stop\"}}\n\n"
        );
        let mut t = MessagesStreamToChat::new(true, CREATED);
        let mut out = Vec::new();
        t.push(input.as_bytes(), &mut out);
        let events = data_events(&out);
        assert!(!events.iter().any(|e| e == "[DONE]"));
        let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
        assert_eq!(
            last,
            json!({"error": {"message": "Overloaded", "type": "server_error", "param": null,
                             "code": "overloaded"}})
        );
        let a = assemble(&out, true);
        assert_eq!(a.reasoning, "The user wants a greeting. ");
        assert!(!a.content.contains("late"));
        let len = out.len();
        t.finish(&mut out);
        t.push(b"data: {\"type\":\"message_stop\"}\n\n", &mut out);
        assert_eq!(out.len(), len, "nothing after an error");
    }

    #[test]
    fn truncated_stream_ends_with_an_interruption_error() {
        let events: Vec<&str> = TOOL_STREAM.split_inclusive("\n\n").collect();
        let cuts = [
            TOOL_STREAM.len() / 2,
            // Everything but message_stop: the finish_reason came, yet not the end.
            TOOL_STREAM.len() - events.last().unwrap().len(),
            // Inside the final event.
            TOOL_STREAM.len() - 3,
            0,
        ];
        for cut in cuts {
            for include_usage in [false, true] {
                let out = run(&TOOL_STREAM.as_bytes()[..cut], include_usage);
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
    }

    #[test]
    fn finish_is_idempotent_and_silent_after_a_complete_stream() {
        let mut t = MessagesStreamToChat::new(false, CREATED);
        let mut out = Vec::new();
        t.push(TEXT_STREAM.as_bytes(), &mut out);
        let len = out.len();
        assert!(out.ends_with(b"data: [DONE]\n\n"));
        t.finish(&mut out);
        assert_eq!(out.len(), len);

        let mut t = MessagesStreamToChat::new(false, CREATED);
        let mut out = Vec::new();
        t.push(&TEXT_STREAM.as_bytes()[..100], &mut out);
        t.finish(&mut out);
        let len = out.len();
        assert!(len > 0);
        t.finish(&mut out);
        t.push(&TEXT_STREAM.as_bytes()[100..], &mut out);
        assert_eq!(out.len(), len, "nothing after the interruption error");
    }

    #[test]
    fn unknown_events_are_ignored() {
        let plain = run(TEXT_STREAM.as_bytes(), false);
        let noisy = TEXT_STREAM.replace(
            "event: ping\n",
            "event: future_event\ndata: {\"type\":\"future_event\",\"x\":1}\n\n\
             : keep-alive\n\nevent: ping\n",
        );
        assert_eq!(run(noisy.as_bytes(), false), plain);
    }
}
