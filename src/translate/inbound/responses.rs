//! OpenAI Responses API callers (`POST /v1/responses`) reaching providers
//! other than OpenAI through the OpenAI Chat Completions pivot.
//!
//! * [`responses_request_to_chat`]: the caller's request body, rewritten for
//!   `POST /v1/chat/completions`.
//!
//! Decisions worth knowing:
//! * `instructions` becomes the first system message; `developer` turns are
//!   system messages too (the pivot's providers know no developer role).
//! * Input items map to chat turns: messages by role, `function_call`
//!   items to the assistant's `tool_calls` (consecutive calls, and calls
//!   right after the assistant's text, share one assistant turn), and
//!   `function_call_output` items to `tool` messages. `reasoning` items from
//!   earlier turns are dropped: they only mean something to OpenAI.
//! * What only OpenAI's stateful service can do is a 400
//!   `unsupported_parameter` naming the field: `previous_response_id`,
//!   `conversation`, `background`, stored `prompt` templates, `store: true`
//!   asked for explicitly, `item_reference` inputs and built-in tools (web
//!   and file search, code interpreter, computer use, image generation,
//!   MCP). An absent `store` (OpenAI's default is to store) is not refused:
//!   the SDKs send nothing, and nothing is stored on this path.
//! * Hints without effect on the answer here (`include`, `truncation`,
//!   `service_tier`, `metadata`, `prompt_cache_key`) are dropped.

use serde_json::{json, Map, Value};

use crate::core::api_error::ApiError;
use crate::core::sse::{SseEvent, SseParser};
use crate::core::usage::Usage;
use crate::translate::chat_input::{invalid_type, invalid_value, json_type, unsupported};
use crate::translate::inbound::CallerTranslator;
use crate::translate::stream::{EventMapping, EventStream, Flow};
use crate::translate::{StreamFault, StreamTranslator};

/// What the filter needs to know about a translated request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponsesRequestInfo {
    pub stream: bool,
}

/// The built-in (OpenAI-hosted) tool types, refused on this path.
const HOSTED_TOOLS: &[&str] = &[
    "web_search",
    "web_search_preview",
    "web_search_preview_2025_03_11",
    "file_search",
    "code_interpreter",
    "computer_use_preview",
    "image_generation",
    "mcp",
    "local_shell",
    "shell",
    "apply_patch",
    "custom",
];

fn openai_only(param: &'static str, what: &str) -> ApiError {
    unsupported(
        param,
        format!(
            "{what} is only available on OpenAI models; this request was routed to another \
             provider."
        ),
    )
}

/// Whether a Responses request asks for what only OpenAI serves (the
/// fields and items the pivot refuses with [`openai_only`], and file or
/// audio inputs): a chain that mixes OpenAI and other targets then keeps
/// only OpenAI's.
pub fn needs_openai(req: &Value) -> bool {
    let field = |name: &str| req.get(name).filter(|v| !v.is_null());
    let stateful = ["previous_response_id", "conversation", "prompt"]
        .iter()
        .any(|name| field(name).is_some())
        || field("background") == Some(&Value::Bool(true))
        || field("store") == Some(&Value::Bool(true));
    let hosted = |v: &Value| {
        v.get("type")
            .and_then(Value::as_str)
            .is_some_and(|kind| HOSTED_TOOLS.contains(&kind))
    };
    let tools = field("tools")
        .and_then(Value::as_array)
        .is_some_and(|tools| tools.iter().any(hosted))
        || field("tool_choice").is_some_and(hosted);
    let part_needs_openai = |part: &Value| match part.get("type").and_then(Value::as_str) {
        Some("input_image") => part.get("file_id").is_some(),
        Some("input_file" | "input_audio") => true,
        _ => false,
    };
    let inputs = field("input")
        .and_then(Value::as_array)
        .is_some_and(|items| {
            items.iter().any(|item| {
                item.get("type").and_then(Value::as_str) == Some("item_reference")
                    || item
                        .get("content")
                        .and_then(Value::as_array)
                        .is_some_and(|parts| parts.iter().any(part_needs_openai))
            })
        });
    stateful || tools || inputs
}

fn bad_input(message: String) -> ApiError {
    invalid_value("input", message)
}

/// One content part of an input message, as a pivot content part.
fn content_part(part: &Value, at: &str) -> Result<Value, ApiError> {
    let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
    match kind {
        "input_text" | "output_text" | "text" => match part.get("text") {
            Some(Value::String(text)) => Ok(json!({"type": "text", "text": text})),
            other => Err(bad_input(format!(
                "{at}.text must be a string, not {}.",
                other.map_or("missing", json_type)
            ))),
        },
        "refusal" => match part.get("refusal") {
            Some(Value::String(text)) => Ok(json!({"type": "text", "text": text})),
            _ => Err(bad_input(format!("{at}.refusal must be a string."))),
        },
        "input_image" => {
            let url = match part.get("image_url") {
                Some(Value::String(url)) => url,
                _ if part.get("file_id").is_some() => {
                    return Err(openai_only("input", "An image given by file_id"))
                }
                _ => return Err(bad_input(format!("{at}.image_url must be a string."))),
            };
            let mut image = Map::new();
            image.insert("url".into(), Value::String(url.clone()));
            if let Some(detail) = part.get("detail").and_then(Value::as_str) {
                image.insert("detail".into(), Value::String(detail.into()));
            }
            Ok(json!({"type": "image_url", "image_url": image}))
        }
        "input_file" | "input_audio" => Err(unsupported(
            "input",
            format!("{at}: {kind} parts are not supported by this provider through this gateway."),
        )),
        other => Err(bad_input(format!(
            "{at}.type {other:?} is not a known content part."
        ))),
    }
}

/// A message item's content: a string, or parts.
fn message_content(content: Option<&Value>, at: &str) -> Result<Value, ApiError> {
    match content {
        Some(Value::String(s)) => Ok(Value::String(s.clone())),
        Some(Value::Array(parts)) => parts
            .iter()
            .enumerate()
            .map(|(i, p)| content_part(p, &format!("{at}.content[{i}]")))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array),
        Some(other) => Err(bad_input(format!(
            "{at}.content must be a string or an array of content parts, not {}.",
            json_type(other)
        ))),
        None => Err(bad_input(format!("{at}.content is required."))),
    }
}

/// Adds a tool call to the assistant turn `function_call` items join: the
/// last turn when it is the assistant's, else a new one.
fn push_tool_call(messages: &mut Vec<Value>, call: Value) {
    let last_assistant = messages
        .last_mut()
        .filter(|m| m.get("role").and_then(Value::as_str) == Some("assistant"));
    if let Some(Value::Object(turn)) = last_assistant {
        match turn.get_mut("tool_calls") {
            Some(Value::Array(calls)) => calls.push(call),
            _ => {
                turn.insert("tool_calls".into(), Value::Array(vec![call]));
            }
        }
        return;
    }
    messages.push(json!({"role": "assistant", "content": null, "tool_calls": [call]}));
}

fn string_field<'a>(item: &'a Value, name: &str, at: &str) -> Result<&'a str, ApiError> {
    item.get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| bad_input(format!("{at}.{name} must be a string.")))
}

/// One input item into the pivot's messages.
fn input_item(item: &Value, i: usize, messages: &mut Vec<Value>) -> Result<(), ApiError> {
    let at = format!("input[{i}]");
    if !item.is_object() {
        return Err(bad_input(format!(
            "{at} must be an object, not {}.",
            json_type(item)
        )));
    }
    // An item without a type with a role is a message (EasyInputMessage).
    let kind = item
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or(if item.get("role").is_some() {
            "message"
        } else {
            ""
        });
    match kind {
        "message" => {
            let role = match string_field(item, "role", &at)? {
                "user" => "user",
                "assistant" => "assistant",
                "system" | "developer" => "system",
                other => {
                    return Err(bad_input(format!(
                        "{at}.role {other:?} is not one of user, assistant, system, developer."
                    )))
                }
            };
            let content = message_content(item.get("content"), &at)?;
            messages.push(json!({"role": role, "content": content}));
        }
        "function_call" => {
            let call_id = string_field(item, "call_id", &at)?;
            let name = string_field(item, "name", &at)?;
            let arguments = string_field(item, "arguments", &at)?;
            let call = json!({
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            });
            push_tool_call(messages, call);
        }
        "function_call_output" => {
            let call_id = string_field(item, "call_id", &at)?;
            let output = match item.get("output") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .collect(),
                _ => return Err(bad_input(format!("{at}.output must be a string."))),
            };
            messages.push(json!({"role": "tool", "tool_call_id": call_id, "content": output}));
        }
        // Earlier turns' reasoning: only OpenAI can read it back.
        "reasoning" => {}
        "item_reference" => return Err(openai_only("input", "An item_reference input")),
        "" => return Err(bad_input(format!("{at}.type is required."))),
        other => {
            return Err(unsupported(
                "input",
                format!(
                    "{at}: {other} items are not supported by this provider through this gateway."
                ),
            ))
        }
    }
    Ok(())
}

/// A function tool in the pivot's nested shape.
fn tool(tool: &Value, i: usize) -> Result<Value, ApiError> {
    let kind = tool.get("type").and_then(Value::as_str).unwrap_or("");
    if HOSTED_TOOLS.contains(&kind) {
        return Err(openai_only("tools", &format!("The built-in tool {kind:?}")));
    }
    if kind != "function" {
        return Err(invalid_value(
            "tools",
            format!("tools[{i}].type {kind:?} is not a known tool type."),
        ));
    }
    let Some(name) = tool.get("name").and_then(Value::as_str) else {
        return Err(invalid_value(
            "tools",
            format!("tools[{i}].name must be a string."),
        ));
    };
    let mut function = Map::new();
    function.insert("name".into(), Value::String(name.into()));
    for key in ["description", "parameters", "strict"] {
        if let Some(v) = tool.get(key).filter(|v| !v.is_null()) {
            function.insert(key.into(), v.clone());
        }
    }
    Ok(json!({"type": "function", "function": function}))
}

fn tool_choice(choice: &Value) -> Result<Value, ApiError> {
    match choice {
        Value::String(s) if matches!(s.as_str(), "auto" | "none" | "required") => {
            Ok(choice.clone())
        }
        Value::Object(o) => match o.get("type").and_then(Value::as_str) {
            Some("function") => match o.get("name").and_then(Value::as_str) {
                Some(name) => Ok(json!({"type": "function", "function": {"name": name}})),
                None => Err(invalid_value(
                    "tool_choice",
                    "tool_choice.name must be a string.".into(),
                )),
            },
            Some(kind) if HOSTED_TOOLS.contains(&kind) => Err(openai_only(
                "tool_choice",
                &format!("The built-in tool {kind:?}"),
            )),
            _ => Err(unsupported(
                "tool_choice",
                "This tool_choice is not supported by this provider through this gateway.".into(),
            )),
        },
        other => Err(invalid_type("tool_choice", "a string or an object", other)),
    }
}

/// `text.format` as the pivot's `response_format` (None for plain text).
fn response_format(text: &Value) -> Result<Option<Value>, ApiError> {
    let Some(format) = text.get("format").filter(|f| !f.is_null()) else {
        return Ok(None);
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "json_object"}))),
        Some("json_schema") => {
            let mut schema = Map::new();
            for key in ["name", "schema", "strict", "description"] {
                if let Some(v) = format.get(key).filter(|v| !v.is_null()) {
                    schema.insert(key.into(), v.clone());
                }
            }
            if !schema.contains_key("name") || !schema.contains_key("schema") {
                return Err(invalid_value(
                    "text",
                    "text.format of type json_schema needs a name and a schema.".into(),
                ));
            }
            Ok(Some(json!({"type": "json_schema", "json_schema": schema})))
        }
        _ => Err(invalid_value(
            "text",
            "text.format.type must be one of text, json_object, json_schema.".into(),
        )),
    }
}

/// The caller's Responses request as a pivot (Chat Completions) request for
/// `upstream_model`.
pub fn responses_request_to_chat(
    body: &[u8],
    upstream_model: &str,
) -> Result<(Vec<u8>, ResponsesRequestInfo), ApiError> {
    let req = crate::translate::request_object(body)?;
    let field = |name: &str| req.get(name).filter(|v| !v.is_null());

    for (name, what) in [
        (
            "previous_response_id",
            "previous_response_id (a stored conversation)",
        ),
        ("conversation", "conversation (a stored conversation)"),
        ("prompt", "A stored prompt template"),
    ] {
        if field(name).is_some() {
            return Err(openai_only(name, what));
        }
    }
    if field("background") == Some(&Value::Bool(true)) {
        return Err(openai_only("background", "Background mode"));
    }
    if field("store") == Some(&Value::Bool(true)) {
        return Err(openai_only("store", "Storing responses (store: true)"));
    }

    let mut messages = Vec::new();
    match field("instructions") {
        None => {}
        Some(Value::String(s)) => messages.push(json!({"role": "system", "content": s})),
        Some(other) => return Err(invalid_type("instructions", "a string", other)),
    }
    match field("input") {
        None => {
            return Err(ApiError::invalid_request(
                Some("missing_required_parameter"),
                "Missing required parameter: 'input'.".into(),
            )
            .with_param("input"))
        }
        Some(Value::String(s)) => messages.push(json!({"role": "user", "content": s})),
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                input_item(item, i, &mut messages)?;
            }
        }
        Some(other) => return Err(invalid_type("input", "a string or an array", other)),
    }

    let mut chat = Map::new();
    chat.insert("model".into(), Value::String(upstream_model.into()));
    chat.insert("messages".into(), Value::Array(messages));

    if let Some(tools) = field("tools") {
        let Value::Array(tools) = tools else {
            return Err(invalid_type("tools", "an array", tools));
        };
        if !tools.is_empty() {
            let tools = tools
                .iter()
                .enumerate()
                .map(|(i, t)| tool(t, i))
                .collect::<Result<Vec<_>, _>>()?;
            chat.insert("tools".into(), Value::Array(tools));
        }
    }
    if let Some(choice) = field("tool_choice") {
        chat.insert("tool_choice".into(), tool_choice(choice)?);
    }
    if let Some(parallel) = field("parallel_tool_calls") {
        chat.insert("parallel_tool_calls".into(), parallel.clone());
    }
    match field("max_output_tokens") {
        None => {}
        Some(v) if v.as_u64().is_some_and(|n| n >= 1) => {
            chat.insert("max_completion_tokens".into(), v.clone());
        }
        Some(other) => {
            return Err(invalid_type(
                "max_output_tokens",
                "a positive integer",
                other,
            ))
        }
    }
    for name in ["temperature", "top_p"] {
        if let Some(v) = field(name) {
            chat.insert(name.into(), v.clone());
        }
    }
    if let Some(text) = field("text") {
        if let Some(format) = response_format(text)? {
            chat.insert("response_format".into(), format);
        }
    }
    if let Some(effort) = field("reasoning").and_then(|r| r.get("effort")) {
        if !effort.is_null() {
            chat.insert("reasoning_effort".into(), effort.clone());
        }
    }
    for (from, to) in [("user", "user"), ("safety_identifier", "user")] {
        if let Some(v) = field(from) {
            chat.insert(to.into(), v.clone());
        }
    }
    let stream = match field("stream") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => return Err(invalid_type("stream", "a boolean", other)),
    };
    if stream {
        chat.insert("stream".into(), Value::Bool(true));
        // response.completed carries the usage.
        chat.insert("stream_options".into(), json!({"include_usage": true}));
    }
    let body = serde_json::to_vec(&Value::Object(chat)).map_err(|e| {
        ApiError::new(
            500,
            "server_error",
            None,
            format!("could not write the translated request: {e}"),
        )
    })?;
    Ok((body, ResponsesRequestInfo { stream }))
}

// ---------------------------------------------------------------------------
// Answers: pivot chat.completion -> Responses object
// ---------------------------------------------------------------------------

/// `prefix` + the pivot's id, unless it already starts with the prefix.
fn prefixed(prefix: &str, id: &str) -> String {
    if id.starts_with(prefix) {
        id.to_string()
    } else if id.is_empty() {
        format!("{prefix}gateway")
    } else {
        format!("{prefix}{id}")
    }
}

/// The pivot's usage in the Responses shape.
fn usage(usage: Option<&Value>) -> Value {
    let read = |p: &str| {
        usage
            .and_then(|u| u.pointer(p))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    let (input, output) = (read("/prompt_tokens"), read("/completion_tokens"));
    json!({
        "input_tokens": input,
        "input_tokens_details": {
            "cached_tokens": read("/prompt_tokens_details/cached_tokens"),
            // OpenAI caches automatically and reports no writes.
            "cache_write_tokens": 0,
        },
        "output_tokens": output,
        "output_tokens_details": {
            "reasoning_tokens": read("/completion_tokens_details/reasoning_tokens")
        },
        "total_tokens": input + output,
    })
}

/// Why an answer stopped short, from the pivot's `finish_reason`.
fn incomplete_reason(finish: Option<&str>) -> Option<&'static str> {
    match finish {
        Some("length") => Some("max_output_tokens"),
        Some("content_filter") => Some("content_filter"),
        _ => None,
    }
}

/// The Responses object around `output` items.
fn response_object(
    id: &str,
    created: u64,
    model: &str,
    output: Vec<Value>,
    finish: Option<&str>,
    usage_value: Option<&Value>,
) -> Value {
    let incomplete = incomplete_reason(finish);
    json!({
        "id": prefixed("resp_", id),
        "object": "response",
        "created_at": created,
        "status": if incomplete.is_some() { "incomplete" } else { "completed" },
        "error": null,
        "incomplete_details": incomplete.map(|reason| json!({"reason": reason})),
        "instructions": null,
        "metadata": {},
        "model": model,
        "output": output,
        "parallel_tool_calls": true,
        "temperature": null,
        "tool_choice": "auto",
        "tools": [],
        "top_p": null,
        "usage": usage(usage_value),
    })
}

/// A complete pivot answer (`chat.completion`) as a Responses object.
pub fn chat_response_to_responses(pivot: &[u8]) -> Result<Vec<u8>, String> {
    let v: Value = crate::core::json::from_slice_lossy(pivot)
        .map_err(|e| format!("the OpenAI response is not valid JSON: {e}"))?;
    let choice = v
        .get("choices")
        .and_then(Value::as_array)
        .and_then(|c| c.first())
        .ok_or("the OpenAI response has no choices")?;
    let empty = Value::Object(Map::new());
    let message = choice.get("message").unwrap_or(&empty);
    fn text<'v>(m: &'v Value, k: &str) -> Option<&'v str> {
        m.get(k).and_then(Value::as_str).filter(|t| !t.is_empty())
    }
    let id = v.get("id").and_then(Value::as_str).unwrap_or_default();
    let mut output = Vec::new();
    let reasoning = text(message, "reasoning_content").or_else(|| text(message, "reasoning"));
    if let Some(reasoning) = reasoning {
        output.push(json!({
            "type": "reasoning", "id": prefixed("rs_", id),
            "summary": [{"type": "summary_text", "text": reasoning}],
        }));
    }
    let mut parts = Vec::new();
    if let Some(t) = text(message, "content") {
        parts.push(json!({"type": "output_text", "text": t, "annotations": []}));
    }
    if let Some(t) = text(message, "refusal") {
        parts.push(json!({"type": "refusal", "refusal": t}));
    }
    if !parts.is_empty() {
        output.push(json!({
            "type": "message", "id": prefixed("msg_", id), "status": "completed",
            "role": "assistant", "content": parts,
        }));
    }
    for call in message
        .get("tool_calls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let call_id = call.get("id").and_then(Value::as_str).unwrap_or_default();
        let function = call.get("function").unwrap_or(&empty);
        let arguments = match function.get("arguments") {
            Some(Value::String(a)) => a.clone(),
            None | Some(Value::Null) => "{}".to_string(),
            Some(other) => other.to_string(),
        };
        output.push(json!({
            "type": "function_call", "id": prefixed("fc_", call_id), "call_id": call_id,
            "name": function.get("name").and_then(Value::as_str).unwrap_or_default(),
            "arguments": arguments, "status": "completed",
        }));
    }
    let created = v.get("created").and_then(Value::as_u64).unwrap_or(0);
    let model = v.get("model").and_then(Value::as_str).unwrap_or_default();
    let finish = choice.get("finish_reason").and_then(Value::as_str);
    let out = response_object(id, created, model, output, finish, v.get("usage"));
    serde_json::to_vec(&out).map_err(|e| format!("could not serialize the answer: {e}"))
}

// ---------------------------------------------------------------------------
// Streams: pivot chat.completion.chunk events -> Responses events
// ---------------------------------------------------------------------------

/// The pivot stream into Responses events (`response.created` first,
/// `response.completed` or `response.incomplete` with the whole response
/// and its usage last; `error` then `response.failed` when it breaks).
pub type ChatStreamToResponses = EventStream<SseParser, ChunksToResponses>;

/// An output item being streamed.
enum Open {
    Message {
        text: String,
    },
    Reasoning {
        text: String,
    },
    /// A tool call: the pivot's index, its call id, name and arguments.
    Call {
        index: u64,
        call_id: String,
        name: String,
        arguments: String,
    },
}

/// Appends one Responses stream event: `kind` as its `type`, numbered.
pub fn write_event(out: &mut Vec<u8>, kind: &str, sequence: u64, mut event: Value) {
    if let Value::Object(fields) = &mut event {
        fields.insert("type".into(), Value::String(kind.into()));
        fields.insert("sequence_number".into(), Value::from(sequence));
    }
    match serde_json::to_vec(&event) {
        Ok(json) => {
            out.extend_from_slice(b"event: ");
            out.extend_from_slice(kind.as_bytes());
            out.extend_from_slice(b"\ndata: ");
            out.extend_from_slice(&json);
            out.extend_from_slice(b"\n\n");
        }
        Err(e) => log::error!("could not serialize a Responses {kind} event: {e}"),
    }
}

/// The per-event mapping of [`ChatStreamToResponses`].
#[derive(Default)]
pub struct ChunksToResponses {
    /// The next event's `sequence_number`.
    sequence: u64,
    started: bool,
    id: String,
    model: String,
    created: u64,
    /// The item being written, with its output index and id.
    open: Option<(usize, String, Open)>,
    /// Items finished so far, for the final response.
    done: Vec<Value>,
    finish_reason: Option<String>,
    usage: Option<Value>,
}

impl ChunksToResponses {
    fn emit(&mut self, out: &mut Vec<u8>, kind: &str, event: Value) {
        write_event(out, kind, self.sequence, event);
        self.sequence += 1;
    }

    /// The response so far. Its status follows the finish reason
    /// (`completed` or `incomplete`) unless `status` says otherwise
    /// (`in_progress` while streaming, `failed` when broken).
    fn response(&self, status: Option<&str>) -> Value {
        let streaming = status == Some("in_progress");
        let finish = self.finish_reason.as_deref().filter(|_| !streaming);
        let mut r = response_object(
            &self.id,
            self.created,
            &self.model,
            self.done.clone(),
            finish,
            self.usage.as_ref(),
        );
        if let Some(status) = status {
            r["status"] = Value::String(status.into());
        }
        if streaming {
            r["usage"] = Value::Null;
        }
        r
    }

    fn start(&mut self, chunk: &Value, out: &mut Vec<u8>) {
        if self.started {
            return;
        }
        self.started = true;
        let text = |k: &str| {
            chunk
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        self.id = prefixed("resp_", &text("id"));
        self.model = text("model");
        self.created = chunk.get("created").and_then(Value::as_u64).unwrap_or(0);
        let response = self.response(Some("in_progress"));
        self.emit(
            out,
            "response.created",
            json!({"response": response.clone()}),
        );
        self.emit(out, "response.in_progress", json!({"response": response}));
    }

    /// Opens an item of this kind unless it is the one open.
    fn open(&mut self, item: Open, out: &mut Vec<u8>) {
        let same = match (&self.open, &item) {
            (Some((_, _, Open::Message { .. })), Open::Message { .. }) => true,
            (Some((_, _, Open::Reasoning { .. })), Open::Reasoning { .. }) => true,
            (Some((_, _, Open::Call { index: a, .. })), Open::Call { index: b, .. }) => a == b,
            _ => false,
        };
        if same {
            return;
        }
        self.close(out);
        let index = self.done.len();
        let base = self.id.trim_start_matches("resp_").to_string();
        let (id, added) = match &item {
            Open::Message { .. } => {
                let id = format!("msg_{base}_{index}");
                (
                    id.clone(),
                    json!({"type": "message", "id": id, "status": "in_progress",
                                    "role": "assistant", "content": []}),
                )
            }
            Open::Reasoning { .. } => {
                let id = format!("rs_{base}_{index}");
                (
                    id.clone(),
                    json!({"type": "reasoning", "id": id, "summary": []}),
                )
            }
            Open::Call { call_id, name, .. } => {
                let id = prefixed("fc_", call_id);
                (
                    id.clone(),
                    json!({"type": "function_call", "id": id, "call_id": call_id,
                                    "name": name, "arguments": "", "status": "in_progress"}),
                )
            }
        };
        self.emit(
            out,
            "response.output_item.added",
            json!({"output_index": index, "item": added}),
        );
        match &item {
            Open::Message { .. } => self.emit(
                out,
                "response.content_part.added",
                json!({
                "item_id": id, "output_index": index, "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": []}}),
            ),
            Open::Reasoning { .. } => self.emit(
                out,
                "response.reasoning_summary_part.added",
                json!({
                "item_id": id, "output_index": index, "summary_index": 0,
                "part": {"type": "summary_text", "text": ""}}),
            ),
            Open::Call { .. } => {}
        }
        self.open = Some((index, id, item));
    }

    /// Finishes the open item, if any.
    fn close(&mut self, out: &mut Vec<u8>) {
        let Some((index, id, item)) = self.open.take() else {
            return;
        };
        let done = match item {
            Open::Message { text } => {
                self.emit(
                    out,
                    "response.output_text.done",
                    json!({
                    "item_id": id, "output_index": index, "content_index": 0, "text": text,
                    "logprobs": []}),
                );
                let part = json!({"type": "output_text", "text": text, "annotations": []});
                self.emit(
                    out,
                    "response.content_part.done",
                    json!({
                    "item_id": id, "output_index": index, "content_index": 0, "part": part}),
                );
                json!({"type": "message", "id": id, "status": "completed", "role": "assistant",
                       "content": [part]})
            }
            Open::Reasoning { text } => {
                self.emit(
                    out,
                    "response.reasoning_summary_text.done",
                    json!({
                    "item_id": id, "output_index": index, "summary_index": 0, "text": text}),
                );
                let part = json!({"type": "summary_text", "text": text});
                self.emit(
                    out,
                    "response.reasoning_summary_part.done",
                    json!({
                    "item_id": id, "output_index": index, "summary_index": 0, "part": part}),
                );
                json!({"type": "reasoning", "id": id, "summary": [part]})
            }
            Open::Call {
                call_id,
                name,
                arguments,
                ..
            } => {
                self.emit(
                    out,
                    "response.function_call_arguments.done",
                    json!({
                    "item_id": id, "output_index": index, "arguments": arguments}),
                );
                json!({"type": "function_call", "id": id, "call_id": call_id, "name": name,
                       "arguments": arguments, "status": "completed"})
            }
        };
        self.emit(
            out,
            "response.output_item.done",
            json!({"output_index": index, "item": done}),
        );
        self.done.push(done);
    }

    fn delta(&mut self, delta: &Value, out: &mut Vec<u8>) {
        let text = |k: &str| {
            delta
                .get(k)
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
        };
        if let Some(t) = text("reasoning_content").or_else(|| text("reasoning")) {
            let t = t.to_string();
            self.open(
                Open::Reasoning {
                    text: String::new(),
                },
                out,
            );
            if let Some((index, id, Open::Reasoning { text })) = &mut self.open {
                text.push_str(&t);
                let event = json!({"item_id": id, "output_index": index, "summary_index": 0,
                                   "delta": t});
                self.emit(out, "response.reasoning_summary_text.delta", event);
            }
        }
        if let Some(t) = text("content") {
            let t = t.to_string();
            self.open(
                Open::Message {
                    text: String::new(),
                },
                out,
            );
            if let Some((index, id, Open::Message { text })) = &mut self.open {
                text.push_str(&t);
                let event = json!({"item_id": id, "output_index": index, "content_index": 0,
                                   "delta": t, "logprobs": []});
                self.emit(out, "response.output_text.delta", event);
            }
        }
        for call in delta
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let index = call.get("index").and_then(Value::as_u64).unwrap_or(0);
            let function = call.get("function");
            let field = |k: &str| function.and_then(|f| f.get(k)).and_then(Value::as_str);
            self.open(
                Open::Call {
                    index,
                    call_id: call
                        .get("id")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                    name: field("name").unwrap_or_default().to_string(),
                    arguments: String::new(),
                },
                out,
            );
            if let Some(piece) = field("arguments").filter(|a| !a.is_empty()) {
                let piece = piece.to_string();
                if let Some((index, id, Open::Call { arguments, .. })) = &mut self.open {
                    arguments.push_str(&piece);
                    let event = json!({"item_id": id, "output_index": index, "delta": piece});
                    self.emit(out, "response.function_call_arguments.delta", event);
                }
            }
        }
    }

    /// Closes what is open and writes the final event.
    fn end(&mut self, out: &mut Vec<u8>) {
        self.close(out);
        let response = self.response(None);
        let kind = if response["status"] == "incomplete" {
            "response.incomplete"
        } else {
            "response.completed"
        };
        self.emit(out, kind, json!({"response": response}));
    }

    fn fail(&mut self, code: &str, message: &str, out: &mut Vec<u8>) {
        self.emit(
            out,
            "error",
            json!({"code": code, "message": message, "param": null}),
        );
        let mut response = self.response(Some("failed"));
        // A failed response's error code is one of a fixed set; the error
        // event before it keeps the precise one.
        let kind = if code.contains("rate_limit") {
            "rate_limit_exceeded"
        } else {
            "server_error"
        };
        response["error"] = json!({"code": kind, "message": message});
        self.emit(out, "response.failed", json!({"response": response}));
    }
}

impl EventMapping for ChunksToResponses {
    type Event = SseEvent;
    const UPSTREAM: &'static str = "provider's";

    fn on_event(&mut self, event: SseEvent, out: &mut Vec<u8>) -> Result<Flow, StreamFault> {
        let data = event.data.trim();
        if data == "[DONE]" {
            self.start(&Value::Null, out);
            self.end(out);
            return Ok(Flow::Ended);
        }
        let Ok(v) = crate::core::json::from_str_lossy::<Value>(data) else {
            return Err(StreamFault::Corrupt);
        };
        self.start(&v, out);
        if let Some(error) = v.get("error").filter(|e| !e.is_null()) {
            let message = error
                .get("message")
                .and_then(Value::as_str)
                .or_else(|| error.as_str())
                .unwrap_or("The provider reported an error in the stream.")
                .to_string();
            let code = error
                .get("code")
                .and_then(Value::as_str)
                .unwrap_or("server_error");
            let code = code.to_string();
            self.fail(&code, &message, out);
            return Ok(Flow::Ended);
        }
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            self.usage = Some(u.clone());
        }
        let choice = v
            .get("choices")
            .and_then(Value::as_array)
            .and_then(|c| c.first());
        if let Some(choice) = choice {
            if let Some(delta) = choice.get("delta") {
                self.delta(delta, out);
            }
            if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
                self.finish_reason = Some(reason.to_string());
            }
        }
        Ok(Flow::Open)
    }

    fn write_error(&mut self, error: &ApiError, out: &mut Vec<u8>) {
        self.start(&Value::Null, out);
        self.fail(error.code.unwrap_or("server_error"), &error.message, out);
    }

    fn usage(&self) -> Option<Usage> {
        self.usage
            .as_ref()
            .and_then(crate::translate::openai_usage::parse_usage)
    }
}

/// The Responses API as a caller of the pivot. Its errors are OpenAI's
/// envelope, so the pivot's pass unchanged.
pub struct Responses;
impl CallerTranslator for Responses {
    fn request_to_pivot(
        &self,
        body: &[u8],
        upstream_model: &str,
        _stream: bool,
    ) -> Result<Vec<u8>, ApiError> {
        Ok(responses_request_to_chat(body, upstream_model)?.0)
    }
    fn answer_from_pivot(&self, pivot: &[u8]) -> Result<Vec<u8>, String> {
        chat_response_to_responses(pivot)
    }
    fn error_body(&self, error: &ApiError) -> Vec<u8> {
        in_responses_terms(error).body()
    }
    fn error_from_pivot(&self, _status: u16, pivot: &[u8]) -> Vec<u8> {
        pivot.to_vec()
    }
    fn stream_from_pivot(&self, reads_pivot: bool) -> Box<dyn StreamTranslator> {
        let t = ChatStreamToResponses::default();
        Box::new(if reads_pivot { t.reading_pivot() } else { t })
    }
}

/// The pivot's parameter names a provider's refusal uses, and the
/// Responses request's names for them.
const PIVOT_PARAMS: &[(&str, &str)] = &[
    ("response_format", "text"),
    ("max_completion_tokens", "max_output_tokens"),
    ("max_tokens", "max_output_tokens"),
    ("messages", "input"),
    ("reasoning_effort", "reasoning"),
];

/// An error about the translated request, named in the caller's terms: a
/// Responses caller never sent `response_format` but `text.format`.
fn in_responses_terms(error: &ApiError) -> ApiError {
    let mut out = error.clone();
    if let Some((_, theirs)) = PIVOT_PARAMS.iter().find(|(p, _)| Some(*p) == error.param) {
        out.param = Some(theirs);
        for (pivot, responses) in PIVOT_PARAMS {
            let shown = if *pivot == "response_format" {
                "text.format"
            } else {
                responses
            };
            out.message = out
                .message
                .replace(&format!("'{pivot}'"), &format!("'{shown}'"));
        }
    }
    out
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_providers_refusal_names_the_responses_parameter() {
        let refusal = ApiError::invalid_request(
            Some("unsupported_parameter"),
            "The Anthropic provider does not support 'response_format' of type json_schema.".into(),
        )
        .with_param("response_format");
        let v: Value = serde_json::from_slice(&Responses.error_body(&refusal)).unwrap();
        assert_eq!(v["error"]["param"], "text");
        assert_eq!(
            v["error"]["message"],
            "The Anthropic provider does not support 'text.format' of type json_schema."
        );
        let other = ApiError::invalid_request(None, "x".into()).with_param("tools");
        let v: Value = serde_json::from_slice(&Responses.error_body(&other)).unwrap();
        assert_eq!(v["error"]["param"], "tools");
    }

    #[test]
    fn what_only_openai_serves_is_recognised() {
        for needs in [
            json!({"input": "x", "previous_response_id": "resp_1"}),
            json!({"input": "x", "store": true}),
            json!({"input": "x", "background": true}),
            json!({"input": "x", "conversation": "conv_1"}),
            json!({"input": "x", "prompt": {"id": "pmpt_1"}}),
            json!({"input": "x", "tools": [{"type": "web_search"}]}),
            json!({"input": "x", "tool_choice": {"type": "file_search"}}),
            json!({"input": [{"type": "item_reference", "id": "msg_1"}]}),
            json!({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}),
            json!({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]}),
        ] {
            assert!(needs_openai(&needs), "{needs}");
        }
        for plain in [
            json!({"input": "x"}),
            json!({"input": "x", "store": false, "previous_response_id": null}),
            json!({"input": "x", "tools": [{"type": "function", "name": "f"}]}),
            json!({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:x"}]}]}),
        ] {
            assert!(!needs_openai(&plain), "{plain}");
        }
    }
    use super::*;

    fn chat(req: Value) -> Value {
        let body = serde_json::to_vec(&req).unwrap();
        let (out, _) = responses_request_to_chat(&body, "claude-x").unwrap();
        serde_json::from_slice(&out).unwrap()
    }

    fn refused(req: Value) -> ApiError {
        let body = serde_json::to_vec(&req).unwrap();
        responses_request_to_chat(&body, "claude-x").unwrap_err()
    }

    #[test]
    fn a_string_input_with_instructions_is_a_system_and_a_user_turn() {
        let out = chat(
            json!({"model": "m", "instructions": "Be terse.", "input": "Hi",
                              "max_output_tokens": 50, "temperature": 0.2}),
        );
        assert_eq!(
            out,
            json!({"model": "claude-x", "messages": [
                {"role": "system", "content": "Be terse."},
                {"role": "user", "content": "Hi"}],
                "max_completion_tokens": 50, "temperature": 0.2})
        );
    }

    #[test]
    fn message_items_keep_their_roles_and_parts() {
        let out = chat(json!({"model": "m", "input": [
            {"role": "developer", "content": "Rules."},
            {"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "What is this?"},
                {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "low"}]},
            {"role": "assistant", "content": [{"type": "output_text", "text": "A cat."}]},
        ]}));
        assert_eq!(
            out["messages"],
            json!([
                {"role": "system", "content": "Rules."},
                {"role": "user", "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA",
                                                        "detail": "low"}}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}])
        );
    }

    #[test]
    fn a_tool_round_trip_becomes_tool_calls_and_tool_messages() {
        let out = chat(json!({"model": "m", "input": [
            {"role": "user", "content": "Weather in Oslo and Rome?"},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "function_call", "call_id": "call_1", "name": "weather",
             "arguments": "{\"city\":\"Oslo\"}"},
            {"type": "function_call", "call_id": "call_2", "name": "weather",
             "arguments": "{\"city\":\"Rome\"}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "4C"},
            {"type": "function_call_output", "call_id": "call_2", "output": "19C"},
        ], "tools": [{"type": "function", "name": "weather", "description": "Weather now",
                      "parameters": {"type": "object"}, "strict": true}],
           "tool_choice": {"type": "function", "name": "weather"}}));
        assert_eq!(
            out["messages"],
            json!([
                {"role": "user", "content": "Weather in Oslo and Rome?"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "weather", "arguments": "{\"city\":\"Oslo\"}"}},
                    {"id": "call_2", "type": "function",
                     "function": {"name": "weather", "arguments": "{\"city\":\"Rome\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "4C"},
                {"role": "tool", "tool_call_id": "call_2", "content": "19C"}])
        );
        assert_eq!(
            out["tools"],
            json!([{"type": "function", "function": {"name": "weather",
                    "description": "Weather now", "parameters": {"type": "object"},
                    "strict": true}}])
        );
        assert_eq!(
            out["tool_choice"],
            json!({"type": "function", "function": {"name": "weather"}})
        );
    }

    #[test]
    fn a_call_after_the_assistants_text_joins_that_turn() {
        let out = chat(json!({"model": "m", "input": [
            {"role": "user", "content": "Go"},
            {"role": "assistant", "content": "Checking."},
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
        ]}));
        assert_eq!(out["messages"][1]["content"], "Checking.");
        assert_eq!(out["messages"][1]["tool_calls"][0]["id"], "c");
        assert_eq!(out["messages"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn json_schema_output_reasoning_and_streaming_carry_over() {
        let out = chat(json!({"model": "m", "input": "x", "stream": true,
            "reasoning": {"effort": "high", "summary": "auto"},
            "text": {"format": {"type": "json_schema", "name": "answer",
                                "schema": {"type": "object"}, "strict": true}}}));
        assert_eq!(
            out["response_format"],
            json!({"type": "json_schema", "json_schema": {"name": "answer",
                   "schema": {"type": "object"}, "strict": true}})
        );
        assert_eq!(out["reasoning_effort"], "high");
        assert_eq!(out["stream"], true);
        assert_eq!(out["stream_options"], json!({"include_usage": true}));
        let plain = chat(json!({"model": "m", "input": "x", "text": {"format": {"type": "text"}}}));
        assert!(plain.get("response_format").is_none() && plain.get("stream").is_none());
    }

    #[test]
    fn every_translation_reads_as_a_valid_pivot_request() {
        use crate::translate::pivot::{ChatRequest, ReasoningEffort};
        let out = chat(json!({"model": "m", "instructions": "i", "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "q"}]},
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c", "output": [
                {"type": "input_text", "text": "o"}]}],
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
            "tool_choice": "required", "max_output_tokens": 64, "top_p": 0.5, "stream": true,
            "reasoning": {"effort": "low"},
            "text": {"format": {"type": "json_object"}}}));
        let Value::Object(req) = &out else {
            panic!("{out}")
        };
        let parsed = ChatRequest::parse(req).unwrap();
        assert_eq!(parsed.max_tokens, Some(64));
        assert_eq!(parsed.reasoning_effort, Some(ReasoningEffort::Low));
        assert_eq!(out["messages"].as_array().map(Vec::len), Some(4));
        assert_eq!(out["messages"][3]["content"], "o");
    }

    #[test]
    fn what_only_openai_can_do_is_refused_naming_the_field() {
        for (req, param) in [
            (
                json!({"input": "x", "previous_response_id": "resp_1"}),
                "previous_response_id",
            ),
            (json!({"input": "x", "store": true}), "store"),
            (json!({"input": "x", "background": true}), "background"),
            (
                json!({"input": "x", "conversation": "conv_1"}),
                "conversation",
            ),
            (
                json!({"input": "x", "tools": [{"type": "web_search"}]}),
                "tools",
            ),
            (
                json!({"input": [{"type": "item_reference", "id": "msg_1"}]}),
                "input",
            ),
        ] {
            let e = refused(req);
            assert_eq!((e.status, e.param), (400, Some(param)), "{}", e.message);
            assert!(
                e.message.contains("only available on OpenAI"),
                "{}",
                e.message
            );
        }
        // Not asking to store is fine.
        assert_eq!(
            chat(json!({"input": "x", "store": false}))["messages"][0]["content"],
            "x"
        );
    }

    #[test]
    fn malformed_requests_say_what_is_wrong() {
        for (req, param, says) in [
            (json!({"model": "m"}), "input", "Missing required parameter"),
            (
                json!({"input": 3}),
                "input",
                "expected a string or an array",
            ),
            (
                json!({"input": [{"role": "boss", "content": "x"}]}),
                "input",
                "input[0].role",
            ),
            (
                json!({"input": [{"type": "function_call", "name": "f"}]}),
                "input",
                "input[0].call_id",
            ),
            (
                json!({"input": "x", "max_output_tokens": 0}),
                "max_output_tokens",
                "positive",
            ),
            (
                json!({"input": "x", "tools": [{"type": "function"}]}),
                "tools",
                "tools[0].name",
            ),
            (
                json!({"input": "x", "text": {"format": {"type": "json_schema"}}}),
                "text",
                "needs a name and a schema",
            ),
        ] {
            let e = refused(req);
            assert_eq!((e.status, e.param), (400, Some(param)), "{}", e.message);
            assert!(e.message.contains(says), "{} lacks {says:?}", e.message);
        }
    }

    fn answer(pivot: Value) -> Value {
        let out = chat_response_to_responses(&serde_json::to_vec(&pivot).unwrap()).unwrap();
        serde_json::from_slice(&out).unwrap()
    }

    #[test]
    fn a_text_answer_is_one_message_item_with_usage() {
        let out = answer(json!({"id": "chatcmpl-9", "object": "chat.completion",
            "created": 1700000000, "model": "claude-x",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "Hello."}}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15,
                      "prompt_tokens_details": {"cached_tokens": 4}}}));
        assert_eq!(out["id"], "resp_chatcmpl-9");
        assert_eq!(
            (out["object"].as_str(), out["status"].as_str()),
            (Some("response"), Some("completed"))
        );
        assert_eq!(out["created_at"], 1700000000);
        assert_eq!(
            out["output"],
            json!([{"type": "message", "id": "msg_chatcmpl-9", "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "Hello.", "annotations": []}]}])
        );
        assert_eq!(
            out["usage"],
            json!({"input_tokens": 12,
                   "input_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 0},
                   "output_tokens": 3, "output_tokens_details": {"reasoning_tokens": 0},
                   "total_tokens": 15})
        );
        assert_eq!(out["incomplete_details"], Value::Null);
    }

    #[test]
    fn tool_calls_and_reasoning_become_their_own_items() {
        let out = answer(json!({"id": "x", "created": 1, "model": "m",
            "choices": [{"finish_reason": "tool_calls", "message": {"role": "assistant",
                "content": null, "reasoning_content": "Need the weather.",
                "tool_calls": [{"id": "call_7", "type": "function",
                    "function": {"name": "weather", "arguments": "{\"city\":\"Oslo\"}"}}]}}]}));
        assert_eq!(out["output"][0]["type"], "reasoning");
        assert_eq!(out["output"][0]["summary"][0]["text"], "Need the weather.");
        assert_eq!(
            out["output"][1],
            json!({"type": "function_call", "id": "fc_call_7", "call_id": "call_7",
                   "name": "weather", "arguments": "{\"city\":\"Oslo\"}",
                   "status": "completed"})
        );
        assert_eq!(out["output"].as_array().map(Vec::len), Some(2));
    }

    #[test]
    fn a_cut_answer_is_incomplete_and_garbage_is_an_error() {
        let out = answer(json!({"id": "x", "choices": [{"finish_reason": "length",
            "message": {"content": "Half"}}]}));
        assert_eq!(out["status"], "incomplete");
        assert_eq!(
            out["incomplete_details"],
            json!({"reason": "max_output_tokens"})
        );
        assert!(chat_response_to_responses(b"not json").is_err());
        assert!(chat_response_to_responses(br#"{"choices": []}"#).is_err());
    }

    fn chunk(v: Value) -> String {
        format!("data: {v}\n\n")
    }

    /// The Responses events for these pivot SSE chunks: (type, data).
    fn stream(chunks: &[String], finish: bool) -> Vec<(String, Value)> {
        let mut s = ChatStreamToResponses::default();
        let mut out = Vec::new();
        for c in chunks {
            s.push(c.as_bytes(), &mut out);
        }
        if finish {
            s.finish(&mut out);
        }
        String::from_utf8(out)
            .unwrap()
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                let (head, data) = e.split_once("\ndata: ").unwrap();
                let v: Value = serde_json::from_str(data).unwrap();
                assert_eq!(head.trim_start_matches("event: "), v["type"]);
                (v["type"].as_str().unwrap().to_string(), v)
            })
            .collect()
    }

    fn text_chunks() -> Vec<String> {
        let head = json!({"id": "c1", "object": "chat.completion.chunk", "created": 7,
                          "model": "claude-x"});
        let with = |extra: Value| {
            let mut v = head.clone();
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            chunk(v)
        };
        vec![
            with(json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})),
            with(json!({"choices": [{"index": 0, "delta": {"content": "Hel"}}]})),
            with(json!({"choices": [{"index": 0, "delta": {"content": "lo."},
                                     "finish_reason": "stop"}]})),
            with(
                json!({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2,
                                                 "total_tokens": 7}}),
            ),
            "data: [DONE]\n\n".to_string(),
        ]
    }

    #[test]
    fn a_text_stream_is_the_sequence_the_sdk_expects() {
        let events = stream(&text_chunks(), true);
        let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            kinds,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        let seq: Vec<u64> = events
            .iter()
            .map(|(_, v)| v["sequence_number"].as_u64().unwrap())
            .collect();
        assert_eq!(seq, (0..10).collect::<Vec<_>>());
        let done = &events[9].1["response"];
        assert_eq!(done["status"], "completed");
        assert_eq!(done["id"], "resp_c1");
        assert_eq!(done["output"][0]["content"][0]["text"], "Hello.");
        assert_eq!(done["usage"]["total_tokens"], 7);
        assert_eq!(events[0].1["response"]["status"], "in_progress");
        assert_eq!(events[6].1["text"], "Hello.");
    }

    #[test]
    fn streamed_tool_calls_are_function_call_items_with_argument_deltas() {
        let c = |delta: Value, finish: Value| {
            chunk(json!({"id": "c2", "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}))
        };
        let chunks = vec![
            c(json!({"content": "Let me check."}), Value::Null),
            c(
                json!({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                     "function": {"name": "weather", "arguments": ""}}]}),
                Value::Null,
            ),
            c(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]}),
                Value::Null,
            ),
            c(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": "\"Oslo\"}"}}]}),
                Value::Null,
            ),
            c(
                json!({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                     "function": {"name": "time", "arguments": "{}"}}]}),
                json!("tool_calls"),
            ),
            "data: [DONE]\n\n".to_string(),
        ];
        let events = stream(&chunks, true);
        let args: Vec<&str> = events
            .iter()
            .filter(|(k, _)| k == "response.function_call_arguments.delta")
            .map(|(_, v)| v["delta"].as_str().unwrap())
            .collect();
        assert_eq!(args, ["{\"city\":", "\"Oslo\"}", "{}"]);
        let (_, last) = events.last().unwrap();
        assert_eq!(last["type"], "response.completed");
        let output = &last["response"]["output"];
        assert_eq!(output[0]["type"], "message");
        assert_eq!(
            output[1],
            json!({"type": "function_call", "id": "fc_call_a", "call_id": "call_a",
                   "name": "weather", "arguments": "{\"city\":\"Oslo\"}", "status": "completed"})
        );
        assert_eq!(output[2]["call_id"], "call_b");
        let added: Vec<u64> = events
            .iter()
            .filter(|(k, _)| k == "response.output_item.added")
            .map(|(_, v)| v["output_index"].as_u64().unwrap())
            .collect();
        assert_eq!(added, [0, 1, 2]);
    }

    #[test]
    fn a_broken_stream_ends_with_error_and_response_failed_never_completed() {
        // Cut before [DONE].
        let chunks = text_chunks();
        let events = stream(&chunks[..2], true);
        let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(kinds[kinds.len() - 2..], ["error", "response.failed"]);
        assert!(!kinds.contains(&"response.completed"));
        assert_eq!(events.last().unwrap().1["response"]["status"], "failed");
        // A corrupt event, and a provider's error in the stream.
        let events = stream(&[chunks[1].clone(), "data: {nope\n\n".into()], false);
        assert_eq!(events.last().unwrap().0, "response.failed");
        let err = chunk(json!({"error": {"message": "overloaded", "code": "overloaded"}}));
        let events = stream(&[chunks[1].clone(), err], false);
        let (_, e) = &events[events.len() - 2];
        assert_eq!(
            (e["code"].as_str(), e["message"].as_str()),
            (Some("overloaded"), Some("overloaded"))
        );
    }

    #[test]
    fn a_cut_off_answer_ends_incomplete() {
        let chunks = vec![
            chunk(json!({"id": "c3", "choices": [{"delta": {"content": "Hal"},
                                                  "finish_reason": "length"}]})),
            "data: [DONE]\n\n".to_string(),
        ];
        let events = stream(&chunks, true);
        let (kind, last) = events.last().unwrap();
        assert_eq!(kind, "response.incomplete");
        assert_eq!(
            last["response"]["incomplete_details"]["reason"],
            "max_output_tokens"
        );
    }
}
