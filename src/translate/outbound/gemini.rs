//! OpenAI Chat Completions callers reaching Google Gemini models through
//! `generateContent` (the Gemini API's `v1beta`; Vertex AI takes the same
//! body for Gemini models).
//!
//! * [`chat_request_to_gemini`]: the caller's request body, rewritten as a
//!   `GenerateContentRequest`. The model is not in the body: the filter puts
//!   it in the path (`models/{model}:generateContent`, or
//!   `:streamGenerateContent?alt=sse` when [`GeminiRequestInfo::stream`]).
//! * [`gemini_response_to_chat`], [`gemini_error_to_chat`], [`caller_status`]:
//!   a non-streamed answer back into OpenAI's shapes.
//! * [`GeminiStreamToChat`]: Gemini's server-sent events (each `data:` a
//!   whole `GenerateContentResponse`, no terminator) translated into
//!   `chat.completion.chunk` events, one upstream event at a time.
//!
//! Choices made, with the reason for each:
//!
//! * Turns: `system`/`developer` messages become `systemInstruction` (one text
//!   part each, in order). Consecutive turns of the same role are merged into
//!   one `Content`, so user and model turns alternate (older Gemini models
//!   reject repeated roles) and parallel tool results land in the one user
//!   turn that must follow the model's function-call turn. Empty text is
//!   dropped (Gemini rejects empty text parts); a message left with no parts
//!   is skipped.
//! * Images: base64 data URLs become `inlineData`; `http(s)://` and `gs://`
//!   URLs become `fileData` (the Gemini API fetches public and signed URLs;
//!   Vertex AI takes `gs://` and public URLs). `fileData.mimeType` is
//!   required, so it is guessed from the URL path's extension (png, jpg/jpeg,
//!   webp, heic, heif, gif) and is `image/jpeg` when there is none: Gemini has
//!   no wildcard type, and it decodes the bytes it fetches anyway.
//!   `input_audio` (wav, mp3) and `file` parts with a base64 `file_data` data
//!   URL (PDFs, ...) become `inlineData`; `file_id` is refused (the gateway
//!   has no OpenAI file store).
//! * Tools: function declarations carry the caller's JSON Schema unchanged in
//!   `parametersJsonSchema`. `parameters` takes Gemini's OpenAPI-subset
//!   `Schema` proto, which rejects common JSON Schema keywords
//!   (`additionalProperties`, `$ref`/`$defs`, `const`, ...) with a 400; the
//!   JSON Schema field accepts them. `strict` is ignored (Gemini has no
//!   equivalent outside a preview mode). `tool_choice` maps to
//!   `toolConfig.functionCallingConfig`: auto -> AUTO, none -> NONE,
//!   required -> ANY, a named function -> ANY with `allowedFunctionNames`.
//!   `parallel_tool_calls: false` is refused: Gemini cannot be told to make
//!   at most one call.
//! * Tool calls in the history become `functionCall` parts (arguments parsed
//!   from their JSON string; invalid JSON or a non-object is a 400); tool
//!   messages become `functionResponse` parts named after the earlier
//!   assistant tool call with that id (the latest one, since generated ids
//!   such as `call_0` repeat across turns). A tool result that is a JSON
//!   object string is sent as that object; anything else is wrapped as
//!   `{"content": <text>}`. No `id` is sent on either: Gemini matches
//!   responses to calls by order, and ids it never issued are not worth the
//!   risk of a rejection.
//! * Thought signatures: a `functionCall` part's `thoughtSignature` is handed
//!   to the caller as `tool_calls[].extra_content.google.thought_signature`
//!   (the convention of Google's own OpenAI-compatible endpoint) and read
//!   back from there. Gemini 3 refuses a function-call turn without one, so
//!   when the caller sends none, the first call of the assistant message gets
//!   Google's documented placeholder [`DUMMY_THOUGHT_SIGNATURE`]. Signatures
//!   on text parts are dropped (optional for Gemini).
//! * `response_format`: `json_object` -> `responseMimeType:
//!   application/json`; `json_schema` -> that plus `responseJsonSchema` (JSON
//!   Schema as given, for the same reason as tools).
//! * `reasoning_effort` -> `thinkingConfig`: minimal 512, low 1024,
//!   medium 8192, high 24576 thinking tokens (the budgets Google's own
//!   compatibility layer uses for low/medium/high; 512 is accepted by every
//!   2.5 model), with `includeThoughts` so thoughts come back as
//!   `reasoning_content`; `none` sends `thinkingBudget: 0` (omitting the
//!   config would leave dynamic thinking on; Gemini 2.5 Pro cannot turn
//!   thinking off and answers that with its own 400).
//! * Sampling: `temperature`, `top_p`, `max_completion_tokens` (or
//!   `max_tokens`) -> `maxOutputTokens`, `n` -> `candidateCount`, `seed`,
//!   `stop` -> `stopSequences`; `presence_penalty`/`frequency_penalty` are sent
//!   unless 0 (some models reject penalties at all, and 0 is the default).
//!   `logprobs: true`, a non-empty `logit_bias` and audio output are refused.
//!   `user`, `metadata`, `store`, `service_tier` are dropped (no effect on
//!   the answer).
//! * Answers: text parts -> `content`, thought parts -> `reasoning_content`,
//!   `functionCall` parts -> `tool_calls` (id: the part's `id`, else
//!   `call_<n>` counted per choice). `finishReason`: STOP -> stop (or
//!   tool_calls when the candidate called a function), MAX_TOKENS -> length,
//!   SAFETY, RECITATION, BLOCKLIST, PROHIBITED_CONTENT, SPII and the IMAGE_
//!   variants -> content_filter, anything else -> stop (or tool_calls).
//!   A prompt blocked before any candidate (`promptFeedback.blockReason`)
//!   answers one choice with null content, a `refusal` naming the reason and
//!   `finish_reason: content_filter`, so SDKs see a normal, filtered answer.
//!   Other part kinds (code execution, generated media) are not shown.
//! * Usage: prompt = `promptTokenCount` + `toolUsePromptTokenCount` (cached
//!   tokens are already inside `promptTokenCount`); completion =
//!   `candidatesTokenCount` + `thoughtsTokenCount`; `cachedContentTokenCount`
//!   -> `prompt_tokens_details.cached_tokens`; `thoughtsTokenCount` ->
//!   `completion_tokens_details.reasoning_tokens`.
//! * Streaming: Gemini never says "done", so the stream is complete when the
//!   upstream body ends after every candidate seen has had its
//!   `finishReason`; the end of the body (`EventMapping::on_end`) then
//!   writes the usage chunk (when asked for) and `[DONE]`. An end before
//!   that, or an `error` object in the stream, gives an OpenAI error event
//!   and no `[DONE]`.

use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::core::api_error::{error_type_for_status, ApiError};
use crate::core::json::{from_slice_lossy, from_str_lossy};
use crate::core::sse::{SseEvent, SseParser};
use crate::core::usage::Usage;
use crate::translate::chat_input::{
    bad_message, has_prefix_ignore_case, invalid_type, invalid_value, json_type, plain_text,
    quoted, unsupported,
};
use crate::translate::chat_output::{
    write_data, CachedTokens, ChatUsage, Delta, FunctionDelta, PivotChunks, ReasoningTokens,
    ToolCallDelta,
};
use crate::translate::outbound::{request_body, ProviderTranslator, Upstream};
use crate::translate::pivot::{
    ChatRequest, HistoryCall, Message, ReasoningEffort, ResponseFormat, Role, Tool, ToolChoice,
};
use crate::translate::stream::{EventMapping, EventStream, Flow};
use crate::translate::{StreamFault, StreamTranslator};

/// Thinking budgets for OpenAI's `reasoning_effort` values.
const THINKING_BUDGETS: [(&str, u64); 4] = [
    ("minimal", 512),
    ("low", 1024),
    ("medium", 8192),
    ("high", 24576),
];
/// Google's documented placeholder for a function call whose thought
/// signature is unknown (history not produced by Gemini, or a client that
/// dropped `extra_content`).
pub const DUMMY_THOUGHT_SIGNATURE: &str = "skip_thought_signature_validator";
/// `fileData.mimeType` when a URL's extension does not tell.
const DEFAULT_IMAGE_MIME: &str = "image/jpeg";

/// What the filter needs to know about a translated request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GeminiRequestInfo {
    /// Call `:streamGenerateContent?alt=sse` rather than `:generateContent`.
    pub stream: bool,
    /// `stream_options.include_usage`: send a final usage chunk.
    pub include_usage: bool,
}

// ---------------------------------------------------------------------------
// Request: OpenAI chat completions -> Gemini generateContent
// ---------------------------------------------------------------------------

/// One Gemini `Content`: a role (`user` or `model`) and its parts.
#[derive(Serialize)]
struct Turn {
    role: &'static str,
    parts: Vec<Value>,
}

/// Appends parts as a turn, merging them into the previous turn when the role
/// repeats. Nothing is appended for no parts (Gemini rejects empty turns).
fn push_turn(turns: &mut Vec<Turn>, role: &'static str, parts: Vec<Value>) {
    if parts.is_empty() {
        return;
    }
    if let Some(last) = turns.last_mut() {
        if last.role == role {
            last.parts.extend(parts);
            return;
        }
    }
    turns.push(Turn { role, parts });
}

fn text_part(text: &str) -> Value {
    json!({ "text": text })
}

/// `data:<media type>[;params];base64,<data>` -> (media type, data).
fn parse_data_url(url: &str) -> Option<(&str, &str)> {
    let rest = url.strip_prefix("data:")?;
    let (meta, data) = rest.split_once(',')?;
    let meta = meta.strip_suffix(";base64")?;
    let mime = meta.split(';').next().unwrap_or_default();
    (!mime.is_empty() && !data.is_empty()).then_some((mime, data))
}

/// An image's media type from the extension of its URL's path.
fn mime_from_url(url: &str) -> &'static str {
    let path = url.split(['?', '#']).next().unwrap_or_default();
    let file = path.rsplit('/').next().unwrap_or_default();
    let ext = file.rsplit_once('.').map(|(_, e)| e).unwrap_or_default();
    const TYPES: [(&str, &str); 7] = [
        ("png", "image/png"),
        ("jpg", "image/jpeg"),
        ("jpeg", "image/jpeg"),
        ("webp", "image/webp"),
        ("heic", "image/heic"),
        ("heif", "image/heif"),
        ("gif", "image/gif"),
    ];
    TYPES
        .iter()
        .find(|(e, _)| e.eq_ignore_ascii_case(ext))
        .map(|(_, mime)| *mime)
        .unwrap_or(DEFAULT_IMAGE_MIME)
}

fn image_part(url: &str, i: usize, j: usize) -> Result<Value, ApiError> {
    if has_prefix_ignore_case(url, "data:") {
        let (mime, data) = parse_data_url(url).ok_or_else(|| {
            bad_message(format!(
                "messages[{i}].content[{j}].image_url.url: only base64 data URLs \
                 (data:<media type>;base64,<data>) are supported."
            ))
        })?;
        return Ok(json!({"inlineData": {"mimeType": mime, "data": data}}));
    }
    if has_prefix_ignore_case(url, "https://")
        || has_prefix_ignore_case(url, "http://")
        || has_prefix_ignore_case(url, "gs://")
    {
        return Ok(json!({"fileData": {"mimeType": mime_from_url(url), "fileUri": url}}));
    }
    Err(bad_message(format!(
        "messages[{i}].content[{j}].image_url.url must be an http(s) or gs:// URL or a base64 \
         data URL."
    )))
}

fn user_part(part: &Value, i: usize, j: usize) -> Result<Option<Value>, ApiError> {
    let kind = part.get("type").and_then(Value::as_str).unwrap_or_default();
    let missing = |what: &str| bad_message(format!("messages[{i}].content[{j}] has no {what}."));
    match kind {
        "text" => {
            let text = part
                .get("text")
                .and_then(Value::as_str)
                .ok_or_else(|| missing("string 'text'"))?;
            Ok((!text.is_empty()).then(|| text_part(text)))
        }
        "image_url" => {
            let url = match part.get("image_url") {
                Some(Value::String(url)) => Some(url.as_str()),
                Some(Value::Object(o)) => o.get("url").and_then(Value::as_str),
                _ => None,
            }
            .ok_or_else(|| missing("string 'image_url.url'"))?;
            image_part(url, i, j).map(Some)
        }
        "input_audio" => {
            let audio = part.get("input_audio");
            let field = |name: &str| audio.and_then(|a| a.get(name)).and_then(Value::as_str);
            let data = field("data").ok_or_else(|| missing("string 'input_audio.data'"))?;
            let mime = match field("format") {
                Some("wav") => "audio/wav",
                Some("mp3") => "audio/mp3",
                _ => {
                    return Err(bad_message(format!(
                        "messages[{i}].content[{j}].input_audio.format must be 'wav' or 'mp3'."
                    )))
                }
            };
            Ok(Some(
                json!({"inlineData": {"mimeType": mime, "data": data}}),
            ))
        }
        "file" => {
            let file = part.get("file");
            let field = |name: &str| file.and_then(|f| f.get(name)).and_then(Value::as_str);
            if let Some(data_url) = field("file_data") {
                let (mime, data) = parse_data_url(data_url).ok_or_else(|| {
                    bad_message(format!(
                        "messages[{i}].content[{j}].file.file_data must be a base64 data URL \
                         (data:<media type>;base64,<data>)."
                    ))
                })?;
                return Ok(Some(
                    json!({"inlineData": {"mimeType": mime, "data": data}}),
                ));
            }
            if field("file_id").is_some() {
                return Err(unsupported(
                    "messages",
                    format!(
                        "messages[{i}].content[{j}]: file ids are not supported by the Gemini \
                         provider through this gateway; send the file inline as 'file_data'."
                    ),
                ));
            }
            Err(missing("'file.file_data'"))
        }
        "" => Err(missing("'type'")),
        other => Err(bad_message(format!(
            "messages[{i}].content[{j}]: content parts of type '{other}' are not supported \
             by the Gemini provider through this gateway; use 'text', 'image_url', \
             'input_audio' or 'file'."
        ))),
    }
}

fn user_parts(content: &Value, i: usize) -> Result<Vec<Value>, ApiError> {
    match content {
        Value::String(s) => Ok(if s.is_empty() {
            Vec::new()
        } else {
            vec![text_part(s)]
        }),
        Value::Array(parts) => {
            let mut out = Vec::with_capacity(parts.len());
            for (j, p) in parts.iter().enumerate() {
                if let Some(part) = user_part(p, i, j)? {
                    out.push(part);
                }
            }
            Ok(out)
        }
        other => Err(bad_message(format!(
            "messages[{i}].content must be a string or an array of content parts, not {}.",
            json_type(other)
        ))),
    }
}

/// A tool call of the history as a `functionCall` part, its thought
/// signature read back from where the caller was handed it.
fn function_call_part(call: HistoryCall<'_>) -> Value {
    let mut part = Map::new();
    part.insert(
        "functionCall".into(),
        json!({"name": call.name, "args": call.arguments}),
    );
    let signature = call
        .raw
        .pointer("/extra_content/google/thought_signature")
        .and_then(Value::as_str);
    if let Some(signature) = signature {
        part.insert("thoughtSignature".into(), Value::String(signature.into()));
    }
    Value::Object(part)
}

/// An assistant message's parts; (id, name) of its tool calls go to `calls`.
fn assistant_parts(
    message: &Message<'_>,
    calls: &mut Vec<(Option<String>, String)>,
) -> Result<Vec<Value>, ApiError> {
    let mut parts: Vec<Value> = message
        .assistant_texts()?
        .into_iter()
        .map(text_part)
        .collect();
    let mut function_parts = Vec::new();
    for call in message.tool_calls("Gemini", false)? {
        calls.push((call.id.map(str::to_string), call.name.to_string()));
        function_parts.push(function_call_part(call));
    }
    let signed = function_parts
        .iter()
        .any(|p| p.get("thoughtSignature").is_some());
    if !signed {
        if let Some(Value::Object(first)) = function_parts.first_mut() {
            first.insert(
                "thoughtSignature".into(),
                Value::String(DUMMY_THOUGHT_SIGNATURE.into()),
            );
        }
    }
    parts.extend(function_parts);
    Ok(parts)
}

/// A tool result as Gemini's `functionResponse.response` object.
fn tool_response(content: &Value, i: usize) -> Result<Value, ApiError> {
    let text = plain_text(content, i)?;
    if let Ok(Value::Object(o)) = serde_json::from_str::<Value>(&text) {
        return Ok(Value::Object(o));
    }
    Ok(json!({ "content": text }))
}

/// `messages` split into the system instruction and alternating turns.
fn convert_messages(chat: &ChatRequest<'_>) -> Result<(Vec<Value>, Vec<Turn>), ApiError> {
    let mut system: Vec<Value> = Vec::new();
    let mut turns: Vec<Turn> = Vec::new();
    // (id, name) of every assistant tool call so far, in order.
    let mut calls: Vec<(Option<String>, String)> = Vec::new();
    for message in chat.messages() {
        let message = message?;
        let (i, content) = (message.index, message.content());
        match message.role {
            Role::System => {
                let text = plain_text(content, i)?;
                if !text.is_empty() {
                    system.push(text_part(&text));
                }
            }
            Role::User => push_turn(&mut turns, "user", user_parts(content, i)?),
            Role::Assistant => {
                let parts = assistant_parts(&message, &mut calls)?;
                push_turn(&mut turns, "model", parts);
            }
            Role::Tool => {
                let id = message.tool_call_id()?;
                let name = calls
                    .iter()
                    .rev()
                    .find(|(call_id, _)| call_id.as_deref() == Some(id))
                    .map(|(_, name)| name.clone())
                    .ok_or_else(|| {
                        bad_message(format!(
                            "messages[{i}]: tool_call_id '{id}' matches no tool call of an \
                             earlier assistant message; the Gemini provider needs the \
                             function's name."
                        ))
                    })?;
                let part = json!({"functionResponse": {
                    "name": name,
                    "response": tool_response(content, i)?,
                }});
                push_turn(&mut turns, "user", vec![part]);
            }
            Role::Other(role) => return Err(message.unsupported_role(role, "Gemini")),
        }
    }
    if turns.is_empty() {
        return Err(bad_message(
            "'messages' must contain at least one user or assistant message with content.".into(),
        ));
    }
    Ok((system, turns))
}

fn convert_tool(tool: &Tool<'_>) -> Value {
    let mut out = Map::new();
    out.insert("name".into(), Value::String(tool.name.to_string()));
    if let Some(d) = tool.description {
        out.insert("description".into(), Value::String(d.to_string()));
    }
    if let Some(p) = tool.parameters {
        out.insert("parametersJsonSchema".into(), p.clone());
    }
    Value::Object(out)
}

/// `tool_choice` -> (Gemini mode, allowed function name).
fn convert_tool_choice(choice: ToolChoice<'_>) -> (&'static str, Option<&str>) {
    match choice {
        ToolChoice::Auto => ("AUTO", None),
        ToolChoice::None => ("NONE", None),
        ToolChoice::Required => ("ANY", None),
        ToolChoice::Named(name) => ("ANY", Some(name)),
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct GenerateContentRequest<'a> {
    contents: Vec<Turn>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system_instruction: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tools: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_config: Option<Value>,
    #[serde(skip_serializing_if = "GenerationConfig::is_empty")]
    generation_config: GenerationConfig<'a>,
}

#[derive(Serialize, Default)]
#[serde(rename_all = "camelCase")]
struct GenerationConfig<'a> {
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    stop_sequences: &'a [&'a str],
    #[serde(skip_serializing_if = "Option::is_none")]
    response_mime_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_json_schema: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    candidate_count: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_output_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    presence_penalty: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    frequency_penalty: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    thinking_config: Option<Value>,
}

impl GenerationConfig<'_> {
    fn is_empty(&self) -> bool {
        self.stop_sequences.is_empty()
            && self.response_mime_type.is_none()
            && self.response_json_schema.is_none()
            && self.candidate_count.is_none()
            && self.max_output_tokens.is_none()
            && self.temperature.is_none()
            && self.top_p.is_none()
            && self.seed.is_none()
            && self.presence_penalty.is_none()
            && self.frequency_penalty.is_none()
            && self.thinking_config.is_none()
    }
}

/// `response_format` -> (`responseMimeType`, `responseJsonSchema`).
fn convert_response_format(
    format: ResponseFormat<'_>,
) -> Result<(Option<&'static str>, Option<&Value>), ApiError> {
    match format {
        ResponseFormat::Text => Ok((None, None)),
        ResponseFormat::JsonObject => Ok((Some("application/json"), None)),
        ResponseFormat::JsonSchema(format) => match format.pointer("/json_schema/schema") {
            Some(schema @ Value::Object(_)) => Ok((Some("application/json"), Some(schema))),
            _ => Err(invalid_value(
                "response_format",
                "'response_format.json_schema.schema' must be a JSON Schema object.".into(),
            )),
        },
    }
}

fn convert_reasoning_effort(effort: ReasoningEffort) -> Value {
    if effort == ReasoningEffort::None {
        return json!({"thinkingBudget": 0});
    }
    let budget = THINKING_BUDGETS
        .iter()
        .find(|(name, _)| *name == effort.name())
        .map_or(0, |(_, budget)| *budget);
    json!({"thinkingBudget": budget, "includeThoughts": true})
}

/// OpenAI chat request body -> Gemini `GenerateContentRequest` body.
pub fn chat_request_to_gemini(
    openai_body: &[u8],
) -> Result<(Vec<u8>, GeminiRequestInfo), ApiError> {
    let req = crate::translate::request_object(openai_body)?;
    let chat = ChatRequest::parse(&req)?;
    let body = generate_content_request(&chat)?;
    Ok((
        body,
        GeminiRequestInfo {
            stream: chat.stream,
            include_usage: chat.stream && chat.include_usage,
        },
    ))
}

/// The pivot request as a Gemini `GenerateContentRequest` body.
pub fn generate_content_request(chat: &ChatRequest<'_>) -> Result<Vec<u8>, ApiError> {
    // Asked-for behaviour Gemini cannot give through this translation.
    if chat.optional("logprobs").and_then(Value::as_bool) == Some(true) {
        return Err(unsupported(
            "logprobs",
            "The Gemini provider does not support 'logprobs' through this gateway.".into(),
        ));
    }
    if chat
        .optional("logit_bias")
        .and_then(Value::as_object)
        .is_some_and(|m| !m.is_empty())
    {
        return Err(unsupported(
            "logit_bias",
            "The Gemini provider does not support 'logit_bias'.".into(),
        ));
    }
    let wants_audio = chat.optional("audio").is_some()
        || chat
            .optional("modalities")
            .and_then(Value::as_array)
            .is_some_and(|m| m.iter().any(|x| x.as_str() == Some("audio")));
    if wants_audio {
        return Err(unsupported(
            "modalities",
            "The Gemini provider does not support audio output through this gateway.".into(),
        ));
    }

    let (system, contents) = convert_messages(chat)?;

    let mut config = GenerationConfig {
        candidate_count: chat.n,
        max_output_tokens: chat.max_tokens,
        thinking_config: chat.reasoning_effort.map(convert_reasoning_effort),
        temperature: chat.temperature,
        top_p: chat.top_p,
        stop_sequences: &chat.stop,
        ..GenerationConfig::default()
    };
    if let Some(format) = chat.response_format {
        let (mime, schema) = convert_response_format(format)?;
        config.response_mime_type = mime;
        config.response_json_schema = schema;
    }
    let nonzero = |v: &&Value| v.as_f64() != Some(0.0);
    config.presence_penalty = chat.number("presence_penalty")?.filter(nonzero);
    config.frequency_penalty = chat.number("frequency_penalty")?.filter(nonzero);
    config.seed = match chat.optional("seed") {
        None => None,
        Some(v) if v.is_i64() || v.is_u64() => Some(v),
        Some(other) => return Err(invalid_type("seed", "an integer", other)),
    };

    let (tools, tool_config) = if chat.tools.is_empty() {
        (None, None)
    } else {
        if chat.parallel_tool_calls == Some(false) {
            return Err(unsupported(
                "parallel_tool_calls",
                "The Gemini provider cannot be limited to one tool call per turn; remove \
                 'parallel_tool_calls: false'."
                    .into(),
            ));
        }
        let tool_config = chat.tool_choice.map(|choice| {
            let (mode, name) = convert_tool_choice(choice);
            let mut calling = Map::new();
            calling.insert("mode".into(), Value::String(mode.into()));
            if let Some(name) = name {
                calling.insert("allowedFunctionNames".into(), json!([name]));
            }
            json!({ "functionCallingConfig": calling })
        });
        let declarations: Vec<Value> = chat.tools.iter().map(convert_tool).collect();
        (
            Some(json!([{ "functionDeclarations": declarations }])),
            tool_config,
        )
    };

    let out = GenerateContentRequest {
        contents,
        system_instruction: (!system.is_empty()).then(|| json!({ "parts": system })),
        tools,
        tool_config,
        generation_config: config,
    };
    request_body(&out, "Gemini")
}

// ---------------------------------------------------------------------------
// Responses: Gemini -> OpenAI
// ---------------------------------------------------------------------------

/// Gemini's `usageMetadata` counts.
#[derive(Debug, Clone, Copy, Default)]
struct RawUsage {
    prompt: u64,
    tool_use_prompt: u64,
    candidates: u64,
    thoughts: u64,
    cached: u64,
}

impl RawUsage {
    fn from_metadata(m: &Value) -> Self {
        let read = |name: &str| m.get(name).and_then(Value::as_u64).unwrap_or(0);
        RawUsage {
            prompt: read("promptTokenCount"),
            tool_use_prompt: read("toolUsePromptTokenCount"),
            candidates: read("candidatesTokenCount"),
            thoughts: read("thoughtsTokenCount"),
            cached: read("cachedContentTokenCount"),
        }
    }

    fn prompt_tokens(&self) -> u64 {
        self.prompt.saturating_add(self.tool_use_prompt)
    }

    fn completion_tokens(&self) -> u64 {
        self.candidates.saturating_add(self.thoughts)
    }

    fn usage(&self) -> Usage {
        Usage {
            input_tokens: self.prompt_tokens(),
            output_tokens: self.completion_tokens(),
            cached_input_tokens: self.cached,
            reasoning_tokens: self.thoughts,
        }
    }

    fn chat(&self) -> ChatUsage {
        let prompt_tokens = self.prompt_tokens();
        let completion_tokens = self.completion_tokens();
        ChatUsage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
            prompt_tokens_details: CachedTokens {
                cached_tokens: self.cached,
            },
            completion_tokens_details: Some(ReasoningTokens {
                reasoning_tokens: self.thoughts,
            }),
        }
    }
}

/// Gemini `finishReason` -> OpenAI `finish_reason`.
fn finish_reason(reason: Option<&str>, called_tools: bool) -> &'static str {
    match reason {
        Some("MAX_TOKENS") => "length",
        Some(
            "SAFETY"
            | "RECITATION"
            | "BLOCKLIST"
            | "PROHIBITED_CONTENT"
            | "SPII"
            | "IMAGE_SAFETY"
            | "IMAGE_PROHIBITED_CONTENT"
            | "IMAGE_RECITATION",
        ) => "content_filter",
        _ if called_tools => "tool_calls",
        // STOP, LANGUAGE, OTHER, MALFORMED_FUNCTION_CALL, unknown ones.
        _ => "stop",
    }
}

/// The refusal text for a prompt Gemini blocked before answering.
fn block_refusal(v: &Value) -> Option<String> {
    let feedback = v.get("promptFeedback")?;
    let reason = feedback.get("blockReason").and_then(Value::as_str)?;
    let detail = feedback
        .get("blockReasonMessage")
        .and_then(Value::as_str)
        .map(|m| format!(": {m}"))
        .unwrap_or_default();
    Some(format!(
        "The Gemini provider blocked the prompt ({reason}){detail}."
    ))
}

/// A `functionCall` part -> (id or None, name, arguments JSON, extra_content).
fn function_call_of(part: &Value) -> Option<(Option<&str>, &str, String, Option<Value>)> {
    let call = part.get("functionCall")?;
    let name = call.get("name").and_then(Value::as_str).unwrap_or_default();
    let id = call
        .get("id")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty());
    let arguments = match call.get("args") {
        None | Some(Value::Null) => "{}".to_string(),
        Some(args) => serde_json::to_string(args).unwrap_or_else(|_| "{}".to_string()),
    };
    let extra = part
        .get("thoughtSignature")
        .and_then(Value::as_str)
        .map(|sig| json!({"google": {"thought_signature": sig}}));
    Some((id, name, arguments, extra))
}

#[derive(Serialize)]
struct ChatCompletion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<Choice>,
    usage: ChatUsage,
}

#[derive(Serialize)]
struct Choice {
    index: u64,
    message: ChatMessage,
    logprobs: (),
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct ChatMessage {
    role: &'static str,
    content: Option<String>,
    refusal: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<ToolCall>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_content: Option<String>,
}

#[derive(Serialize)]
struct ToolCall {
    id: String,
    #[serde(rename = "type")]
    kind: &'static str,
    function: FunctionCall,
    #[serde(skip_serializing_if = "Option::is_none")]
    extra_content: Option<Value>,
}

#[derive(Serialize)]
struct FunctionCall {
    name: String,
    arguments: String,
}

/// A candidate's `index`; absent means 0 (proto3 JSON leaves defaults out).
fn candidate_index(candidate: &Value) -> u64 {
    candidate.get("index").and_then(Value::as_u64).unwrap_or(0)
}

fn candidate_choice(candidate: &Value, index: u64) -> Choice {
    let mut text: Option<String> = None;
    let mut reasoning: Option<String> = None;
    let mut tool_calls = Vec::new();
    let parts = candidate
        .pointer("/content/parts")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    for part in parts {
        if let Some((id, name, arguments, extra)) = function_call_of(part) {
            let id = id
                .map(str::to_string)
                .unwrap_or_else(|| format!("call_{}", tool_calls.len()));
            tool_calls.push(ToolCall {
                id,
                kind: "function",
                function: FunctionCall {
                    name: name.to_string(),
                    arguments,
                },
                extra_content: extra,
            });
            continue;
        }
        let Some(t) = part.get("text").and_then(Value::as_str) else {
            // Code execution, generated media, ...: nothing OpenAI can show.
            continue;
        };
        let target = if part.get("thought").and_then(Value::as_bool) == Some(true) {
            &mut reasoning
        } else {
            &mut text
        };
        target.get_or_insert_with(String::new).push_str(t);
    }
    let reason = candidate.get("finishReason").and_then(Value::as_str);
    Choice {
        index,
        finish_reason: finish_reason(reason, !tool_calls.is_empty()),
        message: ChatMessage {
            role: "assistant",
            content: text,
            refusal: None,
            tool_calls,
            reasoning_content: reasoning,
        },
        logprobs: (),
    }
}

fn chat_id(v: &Value, created: u64) -> String {
    match v.get("responseId").and_then(Value::as_str) {
        Some(id) if !id.is_empty() => format!("chatcmpl-{id}"),
        _ => format!("chatcmpl-gemini-{created}"),
    }
}

/// Gemini `GenerateContentResponse` -> OpenAI `chat.completion` JSON.
/// `model` names the answer unless the response has its `modelVersion`;
/// `created` is the unix time to report.
pub fn gemini_response_to_chat(
    gemini_body: &[u8],
    model: &str,
    created: u64,
) -> Result<Vec<u8>, String> {
    let v: Value = from_slice_lossy(gemini_body)
        .map_err(|e| format!("the Gemini response is not valid JSON: {e}"))?;
    if !v.is_object() {
        return Err("the Gemini response is not a JSON object".into());
    }
    if let Some(message) = v.pointer("/error/message").and_then(Value::as_str) {
        return Err(format!("the Gemini response is an error: {message}"));
    }
    let candidates = v
        .get("candidates")
        .and_then(Value::as_array)
        .filter(|c| !c.is_empty());
    let mut choices: Vec<Choice> = match candidates {
        Some(candidates) => candidates
            .iter()
            .map(|c| candidate_choice(c, candidate_index(c)))
            .collect(),
        None => {
            let refusal = block_refusal(&v)
                .ok_or("the Gemini response has neither candidates nor a block reason")?;
            vec![Choice {
                index: 0,
                message: ChatMessage {
                    role: "assistant",
                    content: None,
                    refusal: Some(refusal),
                    tool_calls: Vec::new(),
                    reasoning_content: None,
                },
                logprobs: (),
                finish_reason: "content_filter",
            }]
        }
    };
    choices.sort_by_key(|c| c.index);
    let usage = v
        .get("usageMetadata")
        .map(RawUsage::from_metadata)
        .unwrap_or_default();
    let id = chat_id(&v, created);
    let completion = ChatCompletion {
        id: &id,
        object: "chat.completion",
        created,
        model: v
            .get("modelVersion")
            .and_then(Value::as_str)
            .filter(|m| !m.is_empty())
            .unwrap_or(model),
        choices,
        usage: usage.chat(),
    };
    serde_json::to_vec(&completion).map_err(|e| format!("could not serialize the answer: {e}"))
}

/// The HTTP status the OpenAI caller sees for a Gemini error status.
///
/// Gemini already answers with the HTTP status of its `google.rpc` code
/// (INVALID_ARGUMENT and FAILED_PRECONDITION 400, UNAUTHENTICATED 401,
/// PERMISSION_DENIED 403, NOT_FOUND 404, ABORTED 409, RESOURCE_EXHAUSTED
/// 429, INTERNAL 500, UNAVAILABLE 503, DEADLINE_EXCEEDED 504), which OpenAI
/// clients read the same way, so those pass unchanged. Two are rewritten:
/// 499 (CANCELLED: the upstream dropped the call) -> 502, as no client knows
/// 499; 501 (UNIMPLEMENTED: a feature the model lacks) -> 400, so SDKs do
/// not retry a request that cannot succeed.
pub fn caller_status(gemini_status: u16) -> u16 {
    match gemini_status {
        499 => 502,
        501 => 400,
        other => other,
    }
}

/// Gemini error `status` (and `ErrorInfo.reason`) -> OpenAI `type` and `code`.
fn map_error_status(
    status: &str,
    reason: Option<&str>,
) -> Option<(&'static str, Option<&'static str>)> {
    if matches!(reason, Some("API_KEY_INVALID" | "API_KEY_EXPIRED")) {
        return Some(("authentication_error", Some("invalid_api_key")));
    }
    Some(match status {
        "INVALID_ARGUMENT" | "FAILED_PRECONDITION" | "OUT_OF_RANGE" | "UNIMPLEMENTED" => {
            ("invalid_request_error", None)
        }
        "UNAUTHENTICATED" => ("authentication_error", None),
        "PERMISSION_DENIED" => ("permission_error", None),
        "NOT_FOUND" => ("not_found_error", None),
        "ALREADY_EXISTS" | "ABORTED" => ("conflict_error", None),
        "RESOURCE_EXHAUSTED" => ("rate_limit_error", Some("rate_limit_exceeded")),
        "UNAVAILABLE" => ("server_error", Some("overloaded")),
        "DEADLINE_EXCEEDED" => ("server_error", Some("provider_timeout")),
        "INTERNAL" | "UNKNOWN" | "DATA_LOSS" | "CANCELLED" => ("server_error", None),
        _ => return None,
    })
}

/// The `error` object of a Gemini error body (also inside a one-element
/// array, as the non-SSE streaming endpoint sends it).
fn error_object(v: &Value) -> Option<&Value> {
    match v {
        Value::Array(items) => items.first().and_then(|first| first.get("error")),
        other => other.get("error"),
    }
    .filter(|e| e.is_object())
}

/// Gemini error reply (`{"error":{"code","message","status","details"}}`) ->
/// OpenAI error body `{"error":{"message","type","param":null,"code"}}`.
/// Non-JSON bodies are quoted (at most 512 bytes).
pub fn gemini_error_to_chat(status: u16, body: &[u8]) -> Vec<u8> {
    let parsed: Option<Value> = from_slice_lossy(body).ok();
    let error = parsed.as_ref().and_then(error_object);
    let reason = error
        .and_then(|e| e.get("details"))
        .and_then(Value::as_array)
        .and_then(|details| {
            details
                .iter()
                .find_map(|d| d.get("reason").and_then(Value::as_str))
        });
    let mapped = error
        .and_then(|e| e.get("status"))
        .and_then(Value::as_str)
        .and_then(|s| map_error_status(s, reason));
    let (kind, code) = mapped.unwrap_or((error_type_for_status(caller_status(status)), None));
    let message = error
        .and_then(|e| e.get("message"))
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty())
        .map(str::to_string)
        // What a proxy in front of it says.
        .or_else(|| {
            parsed
                .as_ref()
                .and_then(crate::core::api_error::message_from_json)
        })
        .unwrap_or_else(|| {
            let text = quoted(body);
            if text.is_empty() {
                format!("The Gemini API returned HTTP {status} with no details.")
            } else {
                format!("The Gemini API returned HTTP {status}: {text}")
            }
        });
    ApiError::new(caller_status(status), kind, code, message).body()
}

// ---------------------------------------------------------------------------
// Streaming: Gemini SSE -> OpenAI chat.completion.chunk SSE
// ---------------------------------------------------------------------------

/// What the stream has said so far for one candidate (one OpenAI choice).
#[derive(Debug)]
struct CandidateState {
    index: u64,
    tool_calls: usize,
    finished: bool,
}

/// Streaming: Gemini SSE bytes in (`alt=sse`), OpenAI chat.completion.chunk
/// SSE bytes out.
pub type GeminiStreamToChat = EventStream<SseParser, GeminiEvents>;

impl GeminiStreamToChat {
    /// `model` names the chunks until a response carries its `modelVersion`;
    /// `created` is the unix time to report.
    pub fn new(include_usage: bool, model: &str, created: u64) -> Self {
        EventStream::reading(
            SseParser::default(),
            GeminiEvents {
                chunks: PivotChunks::new(include_usage, model, created),
                candidates: Vec::new(),
                usage: None,
            },
        )
    }
}

/// The per-event mapping of [`GeminiStreamToChat`].
pub struct GeminiEvents {
    chunks: PivotChunks,
    candidates: Vec<CandidateState>,
    usage: Option<RawUsage>,
}

impl EventMapping for GeminiEvents {
    type Event = SseEvent;
    const UPSTREAM: &'static str = "Gemini";

    fn on_event(&mut self, event: SseEvent, out: &mut Vec<u8>) -> Result<Flow, StreamFault> {
        let Ok(v) = from_str_lossy::<Value>(&event.data) else {
            return Err(StreamFault::Corrupt);
        };
        if let Some(error) = error_object(&v) {
            let status = error
                .get("code")
                .and_then(Value::as_u64)
                .and_then(|c| u16::try_from(c).ok())
                .unwrap_or(500);
            write_data(out, &gemini_error_to_chat(status, event.data.as_bytes()));
            return Ok(Flow::Ended);
        }
        self.handle(&v, out);
        Ok(Flow::Open)
    }

    /// Gemini has no end marker: the answer is complete when every
    /// candidate seen has finished.
    fn on_end(&mut self, out: &mut Vec<u8>) -> Flow {
        let complete = !self.candidates.is_empty() && self.candidates.iter().all(|c| c.finished);
        if !complete {
            return Flow::Open;
        }
        self.chunks.end(out, self.usage.unwrap_or_default().chat());
        Flow::Ended
    }

    fn write_error(&mut self, error: &ApiError, out: &mut Vec<u8>) {
        write_data(out, &error.body());
    }

    /// Token counts of the last `usageMetadata` seen.
    fn usage(&self) -> Option<Usage> {
        self.usage.map(|u| u.usage())
    }
}

impl GeminiEvents {
    fn emit(&self, out: &mut Vec<u8>, index: u64, delta: Delta<'_>, finish: Option<&'static str>) {
        self.chunks.delta(out, index, delta, finish);
    }

    /// The state of candidate `index`; its first sight announces the role.
    fn candidate(&mut self, index: u64, out: &mut Vec<u8>) -> usize {
        if let Some(k) = self.candidates.iter().position(|c| c.index == index) {
            return k;
        }
        self.candidates.push(CandidateState {
            index,
            tool_calls: 0,
            finished: false,
        });
        let delta = Delta {
            role: Some("assistant"),
            content: Some(""),
            ..Delta::default()
        };
        self.emit(out, index, delta, None);
        self.candidates.len().saturating_sub(1)
    }

    fn handle(&mut self, v: &Value, out: &mut Vec<u8>) {
        if self.chunks.id.is_empty() {
            self.chunks.id = chat_id(v, self.chunks.created);
        }
        if let Some(model) = v.get("modelVersion").and_then(Value::as_str) {
            if !model.is_empty() && model != self.chunks.model {
                self.chunks.model = model.to_string();
            }
        }
        if let Some(m) = v.get("usageMetadata").filter(|m| m.is_object()) {
            self.usage = Some(RawUsage::from_metadata(m));
        }
        let candidates = v
            .get("candidates")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        if candidates.is_empty() {
            if let Some(refusal) = block_refusal(v) {
                let k = self.candidate(0, out);
                if let Some(state) = self.candidates.get_mut(k) {
                    if state.finished {
                        return;
                    }
                    state.finished = true;
                }
                let delta = Delta {
                    refusal: Some(&refusal),
                    ..Delta::default()
                };
                self.emit(out, 0, delta, None);
                self.emit(out, 0, Delta::default(), Some("content_filter"));
            }
            return;
        }
        for candidate in candidates {
            self.handle_candidate(candidate, candidate_index(candidate), out);
        }
    }

    fn handle_candidate(&mut self, candidate: &Value, index: u64, out: &mut Vec<u8>) {
        let k = self.candidate(index, out);
        if self.candidates.get(k).is_none_or(|c| c.finished) {
            return;
        }
        let parts = candidate
            .pointer("/content/parts")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        for part in parts {
            if let Some((id, name, arguments, extra)) = function_call_of(part) {
                let Some(state) = self.candidates.get_mut(k) else {
                    return;
                };
                let n = state.tool_calls;
                state.tool_calls = n.saturating_add(1);
                let generated;
                let id = match id {
                    Some(id) => id,
                    None => {
                        generated = format!("call_{n}");
                        &generated
                    }
                };
                let call = ToolCallDelta {
                    index: n,
                    id: Some(id),
                    kind: Some("function"),
                    function: FunctionDelta {
                        name: Some(name),
                        arguments: &arguments,
                    },
                    extra_content: extra,
                };
                let delta = Delta {
                    tool_calls: Some([call]),
                    ..Delta::default()
                };
                self.emit(out, index, delta, None);
                continue;
            }
            let Some(text) = part.get("text").and_then(Value::as_str) else {
                continue;
            };
            if text.is_empty() {
                // A part carrying only a thought signature.
                continue;
            }
            let delta = if part.get("thought").and_then(Value::as_bool) == Some(true) {
                Delta {
                    reasoning_content: Some(text),
                    ..Delta::default()
                }
            } else {
                Delta {
                    content: Some(text),
                    ..Delta::default()
                }
            };
            self.emit(out, index, delta, None);
        }
        let Some(reason) = candidate.get("finishReason").and_then(Value::as_str) else {
            return;
        };
        let Some(state) = self.candidates.get_mut(k) else {
            return;
        };
        state.finished = true;
        let finish = finish_reason(Some(reason), state.tool_calls > 0);
        self.emit(out, index, Delta::default(), Some(finish));
    }
}

// ---------------------------------------------------------------------------

/// Gemini `generateContent` (also on Vertex AI).
pub struct Gemini;
impl ProviderTranslator for Gemini {
    fn request_from_pivot(
        &self,
        chat: &ChatRequest<'_>,
        _upstream: &Upstream<'_>,
    ) -> Result<Vec<u8>, ApiError> {
        generate_content_request(chat)
    }
    fn answer_to_pivot(&self, body: &[u8], model: &str, created: u64) -> Result<Vec<u8>, String> {
        gemini_response_to_chat(body, model, created)
    }
    fn caller_status(&self, status: u16, _error_type: Option<&str>) -> u16 {
        caller_status(status)
    }
    fn error_to_pivot(&self, status: u16, _error_type: Option<&str>, body: &[u8]) -> Vec<u8> {
        gemini_error_to_chat(status, body)
    }
    fn stream_to_pivot(
        &self,
        include_usage: bool,
        model: &str,
        created: u64,
    ) -> Box<dyn StreamTranslator> {
        Box::new(GeminiStreamToChat::new(include_usage, model, created))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const TEXT_STREAM: &str =
        include_str!("../../../tests/fixtures/gemini/provider_text_stream.sse");
    const TOOL_STREAM: &str =
        include_str!("../../../tests/fixtures/gemini/provider_tool_stream.sse");
    const TOOL_RESPONSE: &str =
        include_str!("../../../tests/fixtures/gemini/provider_response_tool_use.json");
    const BLOCKED_RESPONSE: &str =
        include_str!("../../../tests/fixtures/gemini/provider_response_blocked.json");
    const ERROR_API_KEY: &str =
        include_str!("../../../tests/fixtures/gemini/provider_error_api_key.json");
    const ERROR_QUOTA: &str =
        include_str!("../../../tests/fixtures/gemini/provider_error_quota.json");
    const CREATED: u64 = 1_700_000_000;
    const DUMMY: &str = DUMMY_THOUGHT_SIGNATURE;

    // ----- requests --------------------------------------------------------

    fn translate_info(req: &Value) -> (Value, GeminiRequestInfo) {
        let body = serde_json::to_vec(req).unwrap();
        let (out, info) = chat_request_to_gemini(&body).unwrap();
        (serde_json::from_slice(&out).unwrap(), info)
    }

    fn translate(req: &Value) -> Value {
        translate_info(req).0
    }

    fn with_messages(messages: Value) -> Value {
        json!({"model": "gemini-2.5-flash", "messages": messages})
    }

    fn user(text: &str) -> Value {
        json!({"role": "user", "parts": [{"text": text}]})
    }

    #[test]
    fn request_table() {
        let weather_schema = json!({
            "type": "object",
            "properties": {"location": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["location"],
            "additionalProperties": false
        });
        let table: Vec<(&str, Value, Value)> = vec![
            (
                "plain text; the model stays out of the body",
                with_messages(json!([{"role": "user", "content": "Hello"}])),
                json!({"contents": [user("Hello")]}),
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
                json!({
                    "contents": [
                        {"role": "user", "parts": [{"text": "Hi"}, {"text": "there"}]},
                        {"role": "model", "parts": [{"text": "Bonjour"}]},
                        user("Encore")],
                    "systemInstruction": {"parts": [
                        {"text": "You are terse."}, {"text": "Answer in French. Always."},
                        {"text": "Be kind."}]}
                }),
            ),
            (
                "sampling parameters; zero penalties and unmappable metadata dropped",
                json!({"model": "m",
                       "messages": [
                           {"role": "user", "content": "What is 2+2?"},
                           {"role": "assistant", "content": "4"},
                           {"role": "user", "content": "And times 3?"}],
                       "max_tokens": 200, "temperature": 0.2, "top_p": 0.9, "stop": "END",
                       "user": "user-123", "stream": true,
                       "stream_options": {"include_usage": true},
                       "frequency_penalty": 0.5, "presence_penalty": 0, "seed": 7,
                       "logit_bias": {}, "logprobs": false, "top_logprobs": null,
                       "service_tier": "auto", "store": true, "metadata": {"k": "v"}, "n": 2,
                       "response_format": {"type": "text"}}),
                json!({
                    "contents": [user("What is 2+2?"),
                                 {"role": "model", "parts": [{"text": "4"}]},
                                 user("And times 3?")],
                    "generationConfig": {"stopSequences": ["END"], "candidateCount": 2,
                                         "maxOutputTokens": 200, "temperature": 0.2,
                                         "topP": 0.9, "seed": 7, "frequencyPenalty": 0.5}
                }),
            ),
            (
                "stop array; max_completion_tokens wins over max_tokens",
                json!({"model": "m", "messages": [{"role": "user", "content": "Count"}],
                       "stop": ["\n\nHuman:", "STOP"], "max_completion_tokens": 300,
                       "max_tokens": 50, "presence_penalty": -0.5}),
                json!({"contents": [user("Count")],
                       "generationConfig": {"stopSequences": ["\n\nHuman:", "STOP"],
                                            "maxOutputTokens": 300, "presencePenalty": -0.5}}),
            ),
            (
                "images (base64, URLs with and without a known extension, gs://), audio, pdf; \
                 empty text dropped",
                with_messages(json!([{"role": "user", "content": [
                    {"type": "text", "text": "What is in these?"},
                    {"type": "text", "text": ""},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUg=="}},
                    {"type": "image_url", "image_url": {"url": "https://upload.wikimedia.org/cat.JPG?w=200#x", "detail": "high"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/pics/dog.webp"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/render?id=7"}},
                    {"type": "image_url", "image_url": "gs://bucket/a/b.heic"},
                    {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
                    {"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBERi0x"}}
                ]}])),
                json!({"contents": [{"role": "user", "parts": [
                    {"text": "What is in these?"},
                    {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgoAAAANSUhEUg=="}},
                    {"fileData": {"mimeType": "image/jpeg",
                                  "fileUri": "https://upload.wikimedia.org/cat.JPG?w=200#x"}},
                    {"fileData": {"mimeType": "image/webp",
                                  "fileUri": "https://example.com/pics/dog.webp"}},
                    {"fileData": {"mimeType": "image/jpeg",
                                  "fileUri": "https://example.com/render?id=7"}},
                    {"fileData": {"mimeType": "image/heic", "fileUri": "gs://bucket/a/b.heic"}},
                    {"inlineData": {"mimeType": "audio/wav", "data": "UklGRg=="}},
                    {"inlineData": {"mimeType": "application/pdf", "data": "JVBERi0x"}}
                ]}]}),
            ),
            (
                "tools, parallel tool calls with a signature, tool results merged into one user \
                 turn with the following user text",
                json!({"model": "m",
                       "messages": [
                           {"role": "user", "content": "Weather in Paris and the time there?"},
                           {"role": "assistant", "content": null, "tool_calls": [
                               {"id": "call_0", "type": "function", "function":
                                   {"name": "get_weather", "arguments": "{\"location\":\"Paris\"}"},
                                "extra_content": {"google": {"thought_signature": "SIG1"}}},
                               {"id": "call_1", "type": "function", "function":
                                   {"name": "get_time", "arguments": ""}}]},
                           {"role": "tool", "tool_call_id": "call_0", "content": "18°C, cloudy"},
                           {"role": "tool", "tool_call_id": "call_1", "content": [
                               {"type": "text", "text": "{\"time\": \"14:05\","},
                               {"type": "text", "text": " \"tz\": \"CET\"}"}]},
                           {"role": "user", "content": "Thanks! Summarise."}],
                       "tools": [
                           {"type": "function", "function": {"name": "get_weather",
                               "description": "Current weather", "parameters": weather_schema,
                               "strict": true}},
                           {"type": "function", "function": {"name": "get_time"}}],
                       "tool_choice": "required"}),
                json!({
                    "contents": [
                        user("Weather in Paris and the time there?"),
                        {"role": "model", "parts": [
                            {"functionCall": {"name": "get_weather", "args": {"location": "Paris"}},
                             "thoughtSignature": "SIG1"},
                            {"functionCall": {"name": "get_time", "args": {}}}]},
                        {"role": "user", "parts": [
                            {"functionResponse": {"name": "get_weather",
                                                  "response": {"content": "18°C, cloudy"}}},
                            {"functionResponse": {"name": "get_time",
                                                  "response": {"time": "14:05", "tz": "CET"}}},
                            {"text": "Thanks! Summarise."}]}],
                    "tools": [{"functionDeclarations": [
                        {"name": "get_weather", "description": "Current weather",
                         "parametersJsonSchema": weather_schema},
                        {"name": "get_time"}]}],
                    "toolConfig": {"functionCallingConfig": {"mode": "ANY"}}
                }),
            ),
            (
                "assistant text with tool call and no signature: placeholder on the first call; \
                 reasoning_content dropped; consecutive assistants merged; empty assistant \
                 skipped; repeated generated ids resolve to the latest call",
                with_messages(json!([
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": ""},
                    {"role": "user", "content": "b"},
                    {"role": "assistant", "content": "Part one.", "tool_calls": [
                        {"id": "call_0", "type": "function", "function":
                            {"name": "first", "arguments": "{}"}}]},
                    {"role": "tool", "tool_call_id": "call_0", "content": "42"},
                    {"role": "assistant", "content": [{"type": "text", "text": "Let me check."}],
                     "reasoning_content": "secret thoughts",
                     "tool_calls": [
                         {"id": "call_0", "type": "function", "function":
                             {"name": "lookup", "arguments": "{\"q\": [1, {\"x\": null}]}"}},
                         {"id": "call_1", "type": "function", "function":
                             {"name": "lookup", "arguments": "{\"q\": []}"}}]},
                    {"role": "assistant", "content": "More."},
                    {"role": "tool", "tool_call_id": "call_0", "content": "[1, 2]"},
                    {"role": "tool", "tool_call_id": "call_1", "content": ""}
                ])),
                json!({"contents": [
                    {"role": "user", "parts": [{"text": "a"}, {"text": "b"}]},
                    {"role": "model", "parts": [
                        {"text": "Part one."},
                        {"functionCall": {"name": "first", "args": {}}, "thoughtSignature": DUMMY}]},
                    {"role": "user", "parts": [
                        {"functionResponse": {"name": "first", "response": {"content": "42"}}}]},
                    {"role": "model", "parts": [
                        {"text": "Let me check."},
                        {"functionCall": {"name": "lookup", "args": {"q": [1, {"x": null}]}},
                         "thoughtSignature": DUMMY},
                        {"functionCall": {"name": "lookup", "args": {"q": []}}},
                        {"text": "More."}]},
                    {"role": "user", "parts": [
                        {"functionResponse": {"name": "lookup", "response": {"content": "[1, 2]"}}},
                        {"functionResponse": {"name": "lookup", "response": {"content": ""}}}]}
                ]}),
            ),
            (
                "json_object",
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
                       "response_format": {"type": "json_object"}}),
                json!({"contents": [user("x")],
                       "generationConfig": {"responseMimeType": "application/json"}}),
            ),
            (
                "json_schema is passed as JSON Schema",
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
                       "response_format": {"type": "json_schema", "json_schema": {
                           "name": "person", "strict": true, "schema": {
                               "type": "object", "properties": {"name": {"type": "string"}},
                               "required": ["name"], "additionalProperties": false}}}}),
                json!({"contents": [user("x")],
                       "generationConfig": {"responseMimeType": "application/json",
                           "responseJsonSchema": {
                               "type": "object", "properties": {"name": {"type": "string"}},
                               "required": ["name"], "additionalProperties": false}}}),
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
            (
                json!({"stream": false, "stream_options": {"include_usage": true}}),
                false,
                false,
            ),
        ];
        for (extra, stream, include_usage) in cases {
            let mut req = base.clone();
            req.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let (out, info) = translate_info(&req);
            assert_eq!(
                info,
                GeminiRequestInfo {
                    stream,
                    include_usage
                },
                "{extra}"
            );
            let keys: Vec<&String> = out.as_object().unwrap().keys().collect();
            assert_eq!(keys, vec!["contents"], "{extra}");
        }
    }

    #[test]
    fn tool_choice_table() {
        let tools = json!([{"type": "function", "function": {"name": "get_weather"}}]);
        let table: Vec<(&str, Value, Value)> = vec![
            (
                "auto",
                json!({"tool_choice": "auto"}),
                json!({"functionCallingConfig": {"mode": "AUTO"}}),
            ),
            (
                "none",
                json!({"tool_choice": "none"}),
                json!({"functionCallingConfig": {"mode": "NONE"}}),
            ),
            (
                "required",
                json!({"tool_choice": "required"}),
                json!({"functionCallingConfig": {"mode": "ANY"}}),
            ),
            (
                "named function",
                json!({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
                json!({"functionCallingConfig": {"mode": "ANY",
                                                 "allowedFunctionNames": ["get_weather"]}}),
            ),
            ("absent", json!({}), Value::Null),
            (
                "parallel on",
                json!({"parallel_tool_calls": true}),
                Value::Null,
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
                out.get("toolConfig").cloned().unwrap_or(Value::Null),
                expected,
                "{name}"
            );
            assert_eq!(
                out["tools"],
                json!([{"functionDeclarations": [{"name": "get_weather"}]}]),
                "{name}"
            );
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
            assert!(out.get("toolConfig").is_none(), "{extra}");
            assert!(out.get("tools").is_none(), "{extra}");
        }
    }

    #[test]
    fn reasoning_effort_table() {
        let table = [
            ("none", json!({"thinkingBudget": 0})),
            (
                "minimal",
                json!({"thinkingBudget": 512, "includeThoughts": true}),
            ),
            (
                "low",
                json!({"thinkingBudget": 1024, "includeThoughts": true}),
            ),
            (
                "medium",
                json!({"thinkingBudget": 8192, "includeThoughts": true}),
            ),
            (
                "high",
                json!({"thinkingBudget": 24576, "includeThoughts": true}),
            ),
        ];
        for (effort, expected) in table {
            let mut req = with_messages(json!([{"role": "user", "content": "think"}]));
            req["reasoning_effort"] = json!(effort);
            req["max_tokens"] = json!(4000);
            let out = translate(&req);
            assert_eq!(
                out["generationConfig"],
                json!({"maxOutputTokens": 4000, "thinkingConfig": expected}),
                "{effort}"
            );
        }
    }

    #[test]
    fn request_error_table() {
        let user = r#"[{"role":"user","content":"x"}]"#;
        let with = |extra: &str| format!(r#"{{"model":"m","messages":{user},{extra}}}"#);
        let tools = r#""tools":[{"type":"function","function":{"name":"f"}}]"#;
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
                "only an empty user message",
                r#"{"model":"m","messages":[{"role":"user","content":""}]}"#.into(),
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
                "audio in an unknown format",
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"input_audio","input_audio":{"data":"AA==","format":"flac"}}]}]}"#.into(),
                Some("messages"),
                Some("invalid_value"),
            ),
            (
                "file by id",
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"file","file":{"file_id":"file-abc"}}]}]}"#.into(),
                Some("messages"),
                Some("unsupported_parameter"),
            ),
            (
                "unknown part type",
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"video","video":{}}]}]}"#.into(),
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
                "tool message for an unknown call",
                r#"{"model":"m","messages":[{"role":"user","content":"x"},{"role":"assistant","tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{}"}}]},{"role":"tool","tool_call_id":"c2","content":"r"}]}"#.into(),
                Some("messages"),
                Some("invalid_value"),
            ),
            (
                "json_schema without a schema",
                with(r#""response_format":{"type":"json_schema","json_schema":{"name":"x"}}"#),
                Some("response_format"),
                Some("invalid_value"),
            ),
            (
                "unknown response_format",
                with(r#""response_format":{"type":"yaml"}"#),
                Some("response_format"),
                Some("invalid_value"),
            ),
            ("n zero", with(r#""n":0"#), Some("n"), Some("invalid_value")),
            ("n a string", with(r#""n":"2""#), Some("n"), Some("invalid_type")),
            (
                "logprobs",
                with(r#""logprobs":true,"top_logprobs":2"#),
                Some("logprobs"),
                Some("unsupported_parameter"),
            ),
            (
                "logit_bias",
                with(r#""logit_bias":{"50256":-100}"#),
                Some("logit_bias"),
                Some("unsupported_parameter"),
            ),
            (
                "audio output",
                with(r#""modalities":["text","audio"],"audio":{"voice":"alloy","format":"wav"}"#),
                Some("modalities"),
                Some("unsupported_parameter"),
            ),
            (
                "parallel_tool_calls false with tools",
                with(&format!(r#"{tools},"parallel_tool_calls":false"#)),
                Some("parallel_tool_calls"),
                Some("unsupported_parameter"),
            ),
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
                "reasoning effort not a string",
                with(r#""reasoning_effort":3"#),
                Some("reasoning_effort"),
                Some("invalid_type"),
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
                "seed as a float",
                with(r#""seed":1.5"#),
                Some("seed"),
                Some("invalid_type"),
            ),
            (
                "stream not a boolean",
                with(r#""stream":"yes""#),
                Some("stream"),
                Some("invalid_type"),
            ),
            (
                "tool of another type",
                with(r#""tools":[{"type":"web_search"}]"#),
                Some("tools"),
                Some("invalid_value"),
            ),
            (
                "tool parameters not an object",
                with(r#""tools":[{"type":"function","function":{"name":"f","parameters":"x"}}]"#),
                Some("tools"),
                Some("invalid_value"),
            ),
            (
                "tool_choice unknown string",
                with(&format!(r#"{tools},"tool_choice":"sometimes""#)),
                Some("tool_choice"),
                Some("invalid_value"),
            ),
            (
                "tool_choice required without tools",
                with(r#""tool_choice":"required""#),
                Some("tool_choice"),
                Some("invalid_value"),
            ),
            (
                "named tool_choice without tools",
                with(r#""tool_choice":{"type":"function","function":{"name":"f"}}"#),
                Some("tool_choice"),
                Some("invalid_value"),
            ),
        ];
        for (name, body, param, code) in table {
            let err = chat_request_to_gemini(body.as_bytes()).expect_err(name);
            assert_eq!(err.status, 400, "{name}");
            assert_eq!(err.kind, "invalid_request_error", "{name}");
            assert_eq!(err.param, param, "{name}");
            assert_eq!(err.code, code, "{name}: {}", err.message);
            assert!(!err.message.is_empty(), "{name}");
        }
    }

    #[test]
    fn error_messages_name_the_place_and_the_provider() {
        let bad_args = br#"{"model":"m","messages":[{"role":"user","content":"x"},{"role":"assistant","tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"not json"}}]}]}"#;
        let err = chat_request_to_gemini(bad_args).unwrap_err();
        assert!(
            err.message.contains("messages[1].tool_calls[0]"),
            "{}",
            err.message
        );
        let body =
            br#"{"model":"m","messages":[{"role":"user","content":"x"}],"logit_bias":{"1":2}}"#;
        let err = chat_request_to_gemini(body).unwrap_err();
        assert!(err.message.contains("Gemini"), "{}", err.message);
        let v: Value = serde_json::from_slice(&err.body()).unwrap();
        assert_eq!(v["error"]["code"], "unsupported_parameter");
        assert_eq!(v["error"]["param"], "logit_bias");
    }

    #[test]
    fn image_mime_types_come_from_the_path() {
        let table = [
            ("https://x.org/a.png", "image/png"),
            ("https://x.org/a.jpeg?x=1.png", "image/jpeg"),
            ("https://x.org/a.GIF", "image/gif"),
            ("https://x.org/a.heif#frag.png", "image/heif"),
            ("https://x.org/dir.png/image", "image/jpeg"),
            ("https://x.org/", "image/jpeg"),
            ("http://x.org", "image/jpeg"),
        ];
        for (url, mime) in table {
            assert_eq!(mime_from_url(url), mime, "{url}");
        }
    }

    // ----- non-streamed responses -----------------------------------------

    fn respond(body: &Value) -> Value {
        let out = gemini_response_to_chat(
            &serde_json::to_vec(body).unwrap(),
            "gemini-fallback",
            CREATED,
        )
        .unwrap();
        serde_json::from_slice(&out).unwrap()
    }

    #[test]
    fn text_response_maps_every_field() {
        let gemini = json!({
            "candidates": [{"content": {"parts": [{"text": "Hi "}, {"text": "there."}],
                                        "role": "model"},
                            "finishReason": "STOP", "index": 0}],
            "usageMetadata": {"promptTokenCount": 12, "candidatesTokenCount": 6,
                              "totalTokenCount": 18},
            "modelVersion": "gemini-2.5-flash-lite", "responseId": "abc123"
        });
        assert_eq!(
            respond(&gemini),
            json!({
                "id": "chatcmpl-abc123", "object": "chat.completion",
                "created": CREATED, "model": "gemini-2.5-flash-lite",
                "choices": [{"index": 0,
                             "message": {"role": "assistant", "content": "Hi there.",
                                         "refusal": null},
                             "logprobs": null, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18,
                          "prompt_tokens_details": {"cached_tokens": 0},
                          "completion_tokens_details": {"reasoning_tokens": 0}}
            })
        );
        // Without modelVersion and responseId: the given model, a made-up id.
        let bare = json!({"candidates": [{"content": {"parts": [{"text": "x"}]},
                                          "finishReason": "STOP"}]});
        let out = respond(&bare);
        assert_eq!(out["model"], "gemini-fallback");
        assert_eq!(out["id"], format!("chatcmpl-gemini-{CREATED}"));
        assert_eq!(out["usage"]["total_tokens"], 0);
    }

    #[test]
    fn tool_use_response_with_thoughts_signatures_and_usage() {
        let gemini: Value = serde_json::from_str(TOOL_RESPONSE).unwrap();
        let out = respond(&gemini);
        assert_eq!(out["model"], "gemini-2.5-pro");
        let message = &out["choices"][0]["message"];
        assert_eq!(message["content"], "I'll check both cities.");
        assert_eq!(
            message["reasoning_content"],
            "Two independent lookups; call both tools."
        );
        assert_eq!(out["choices"][0]["finish_reason"], "tool_calls");
        let calls = message["tool_calls"].as_array().unwrap();
        let parts: Vec<&Value> = gemini["candidates"][0]["content"]["parts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p.get("functionCall").is_some())
            .collect();
        assert_eq!(calls.len(), 2);
        for (k, (call, part)) in calls.iter().zip(parts).enumerate() {
            assert_eq!(call["id"], format!("call_{k}"));
            assert_eq!(call["type"], "function");
            assert_eq!(call["function"]["name"], part["functionCall"]["name"]);
            let arguments = call["function"]["arguments"].as_str().unwrap();
            let parsed: Value = serde_json::from_str(arguments).unwrap();
            assert_eq!(parsed, part["functionCall"]["args"]);
            match part.get("thoughtSignature") {
                Some(sig) => assert_eq!(call["extra_content"]["google"]["thought_signature"], *sig),
                None => assert!(call.get("extra_content").is_none()),
            }
        }
        assert_eq!(
            out["usage"],
            json!({"prompt_tokens": 4163, "completion_tokens": 254, "total_tokens": 4417,
                   "prompt_tokens_details": {"cached_tokens": 1800},
                   "completion_tokens_details": {"reasoning_tokens": 193}})
        );
    }

    #[test]
    fn answer_round_trips_into_the_next_request() {
        // The assistant message an SDK echoes back carries the signature.
        let answer = respond(&serde_json::from_str(TOOL_RESPONSE).unwrap());
        let mut assistant = answer["choices"][0]["message"].clone();
        assistant
            .as_object_mut()
            .unwrap()
            .remove("reasoning_content");
        let req = with_messages(json!([
            {"role": "user", "content": "Weather?"},
            assistant,
            {"role": "tool", "tool_call_id": "call_0", "content": "{\"temp\": 21}"},
            {"role": "tool", "tool_call_id": "call_1", "content": "cold"}
        ]));
        let out = translate(&req);
        let model_parts = out["contents"][1]["parts"].as_array().unwrap();
        assert_eq!(model_parts[0], json!({"text": "I'll check both cities."}));
        assert_eq!(
            model_parts[1]["thoughtSignature"],
            "CpMCAdHtim8Zx0bq0sV1RxQd2gN4yk7Jf3pW6uY8cT2eL5oA"
        );
        assert!(model_parts[2].get("thoughtSignature").is_none());
        assert_eq!(
            model_parts[2]["functionCall"]["args"]["location"],
            "Zürich \"ZH\""
        );
        assert_eq!(
            out["contents"][2]["parts"],
            json!([
                {"functionResponse": {"name": "get_weather", "response": {"temp": 21}}},
                {"functionResponse": {"name": "get_weather", "response": {"content": "cold"}}}
            ])
        );
    }

    #[test]
    fn functions_with_ids_keep_them() {
        let gemini = json!({"candidates": [{"content": {"parts": [
            {"functionCall": {"id": "fc_7", "name": "a", "args": {"x": 1}}},
            {"functionCall": {"name": "b"}}]}, "finishReason": "STOP"}]});
        let calls = respond(&gemini)["choices"][0]["message"]["tool_calls"].clone();
        assert_eq!(calls[0]["id"], "fc_7");
        assert_eq!(calls[1]["id"], "call_1");
        assert_eq!(calls[1]["function"]["arguments"], "{}");
    }

    #[test]
    fn several_candidates_become_several_choices() {
        let gemini = json!({"candidates": [
            {"content": {"parts": [{"text": "B"}]}, "finishReason": "MAX_TOKENS", "index": 1},
            {"content": {"parts": [{"text": "A"}]}, "finishReason": "STOP"}]});
        let out = respond(&gemini);
        let choices = out["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 2);
        assert_eq!(choices[0]["index"], 0);
        assert_eq!(choices[0]["message"]["content"], "A");
        assert_eq!(choices[1]["index"], 1);
        assert_eq!(choices[1]["message"]["content"], "B");
        assert_eq!(choices[1]["finish_reason"], "length");
    }

    #[test]
    fn blocked_prompt_is_a_filtered_answer() {
        let out = respond(&serde_json::from_str(BLOCKED_RESPONSE).unwrap());
        let choice = &out["choices"][0];
        assert_eq!(choice["finish_reason"], "content_filter");
        assert!(choice["message"]["content"].is_null());
        let refusal = choice["message"]["refusal"].as_str().unwrap();
        assert!(refusal.contains("PROHIBITED_CONTENT"), "{refusal}");
        assert_eq!(out["usage"]["prompt_tokens"], 14);
        // A candidate stopped for safety has no content at all.
        let gemini = json!({"candidates": [{"finishReason": "SAFETY", "index": 0,
            "safetyRatings": [{"category": "HARM_CATEGORY_HARASSMENT",
                               "probability": "HIGH", "blocked": true}]}]});
        let out = respond(&gemini);
        assert!(out["choices"][0]["message"]["content"].is_null());
        assert_eq!(out["choices"][0]["finish_reason"], "content_filter");
    }

    #[test]
    fn every_finish_reason_maps() {
        let table = [
            (json!("STOP"), false, "stop"),
            (json!("STOP"), true, "tool_calls"),
            (json!("MAX_TOKENS"), false, "length"),
            (json!("MAX_TOKENS"), true, "length"),
            (json!("SAFETY"), false, "content_filter"),
            (json!("RECITATION"), false, "content_filter"),
            (json!("BLOCKLIST"), false, "content_filter"),
            (json!("PROHIBITED_CONTENT"), false, "content_filter"),
            (json!("SPII"), true, "content_filter"),
            (json!("IMAGE_SAFETY"), false, "content_filter"),
            (json!("LANGUAGE"), false, "stop"),
            (json!("OTHER"), false, "stop"),
            (json!("MALFORMED_FUNCTION_CALL"), false, "stop"),
            (json!("FINISH_REASON_UNSPECIFIED"), true, "tool_calls"),
            (Value::Null, false, "stop"),
        ];
        for (reason, call, finish) in table {
            let mut parts = vec![json!({"text": "x"})];
            if call {
                parts.push(json!({"functionCall": {"name": "f", "args": {}}}));
            }
            let body = json!({"candidates": [{"content": {"parts": parts, "role": "model"},
                                              "finishReason": reason}]});
            assert_eq!(
                respond(&body)["choices"][0]["finish_reason"],
                finish,
                "{reason} {call}"
            );
        }
    }

    #[test]
    fn unreadable_responses_are_errors() {
        for body in [
            &b"not json"[..],
            b"[]",
            b"{}",
            br#"{"candidates":[]}"#,
            b"",
            br#"{"error":{"code":500,"message":"boom","status":"INTERNAL"}}"#,
        ] {
            assert!(
                gemini_response_to_chat(body, "m", CREATED).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    // ----- errors -----------------------------------------------------------

    #[test]
    fn error_table() {
        let gemini = |code: u16, status: &str, message: &str| {
            json!({"error": {"code": code, "message": message, "status": status}}).to_string()
        };
        // (status, body, type, code, message must contain)
        let table: Vec<(u16, String, &str, Value, &str)> = vec![
            (
                400,
                gemini(400, "INVALID_ARGUMENT", "Invalid JSON payload received."),
                "invalid_request_error",
                Value::Null,
                "Invalid JSON payload",
            ),
            (
                400,
                ERROR_API_KEY.into(),
                "authentication_error",
                json!("invalid_api_key"),
                "API key not valid",
            ),
            (
                400,
                gemini(
                    400,
                    "FAILED_PRECONDITION",
                    "User location is not supported.",
                ),
                "invalid_request_error",
                Value::Null,
                "location",
            ),
            (
                401,
                gemini(401, "UNAUTHENTICATED", "Request had invalid credentials."),
                "authentication_error",
                Value::Null,
                "invalid credentials",
            ),
            (
                403,
                gemini(403, "PERMISSION_DENIED", "Permission denied on resource."),
                "permission_error",
                Value::Null,
                "Permission denied",
            ),
            (
                404,
                gemini(
                    404,
                    "NOT_FOUND",
                    "models/gemini-9 is not found for API version v1beta",
                ),
                "not_found_error",
                Value::Null,
                "models/gemini-9",
            ),
            (
                429,
                ERROR_QUOTA.into(),
                "rate_limit_error",
                json!("rate_limit_exceeded"),
                "exceeded your current quota",
            ),
            (
                500,
                gemini(500, "INTERNAL", "An internal error has occurred."),
                "server_error",
                Value::Null,
                "internal error",
            ),
            (
                503,
                gemini(
                    503,
                    "UNAVAILABLE",
                    "The model is overloaded. Please try again later.",
                ),
                "server_error",
                json!("overloaded"),
                "overloaded",
            ),
            (
                504,
                gemini(
                    504,
                    "DEADLINE_EXCEEDED",
                    "Deadline expired before operation could complete.",
                ),
                "server_error",
                json!("provider_timeout"),
                "Deadline expired",
            ),
            (
                501,
                gemini(501, "UNIMPLEMENTED", "Not supported."),
                "invalid_request_error",
                Value::Null,
                "Not supported.",
            ),
            (
                400,
                format!("[{}]", gemini(400, "INVALID_ARGUMENT", "in an array")),
                "invalid_request_error",
                Value::Null,
                "in an array",
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
                429,
                r#"{"error":{"message":"slow down"}}"#.into(),
                "rate_limit_error",
                Value::Null,
                "slow down",
            ),
            (
                499,
                gemini(499, "CANCELLED", "The operation was cancelled."),
                "server_error",
                Value::Null,
                "cancelled",
            ),
        ];
        for (status, body, kind, code, text) in table {
            let v: Value =
                serde_json::from_slice(&gemini_error_to_chat(status, body.as_bytes())).unwrap();
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
                serde_json::from_slice(&gemini_error_to_chat(500, body.as_bytes())).unwrap();
            let message = v["error"]["message"].as_str().unwrap();
            assert!(message.len() < 600, "{}", message.len());
            assert!(message.len() > 400, "{}", message.len());
            assert!(!message.contains('\u{FFFD}'));
        }
    }

    #[test]
    fn caller_status_table() {
        for (upstream, caller) in [
            (400, 400),
            (401, 401),
            (403, 403),
            (404, 404),
            (409, 409),
            (429, 429),
            (499, 502),
            (500, 500),
            (501, 400),
            (503, 503),
            (504, 504),
            (200, 200),
        ] {
            assert_eq!(caller_status(upstream), caller, "{upstream}");
        }
    }

    // ----- streaming ----------------------------------------------------------

    fn run_pieces(pieces: &[&[u8]], include_usage: bool) -> Vec<u8> {
        let mut t = GeminiStreamToChat::new(include_usage, "gemini-requested", CREATED);
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

    /// One choice's reassembled stream.
    #[derive(Debug, Default)]
    struct Assembled {
        roles: usize,
        content: String,
        reasoning: String,
        refusal: String,
        /// index -> (id, name, arguments, extra_content)
        tools: BTreeMap<u64, (String, String, String, Value)>,
        finish_reasons: Vec<String>,
    }

    #[derive(Debug, Default)]
    struct Stream {
        id: String,
        model: String,
        choices: BTreeMap<u64, Assembled>,
        usage_chunks: Vec<Value>,
        done_last: bool,
        errors: Vec<Value>,
    }

    fn assemble(out: &[u8], include_usage: bool) -> Stream {
        let events = data_events(out);
        let mut s = Stream {
            done_last: events.last().map(String::as_str) == Some("[DONE]"),
            ..Stream::default()
        };
        assert!(
            events.iter().filter(|e| *e == "[DONE]").count() <= 1,
            "[DONE] at most once"
        );
        for event in events.iter().filter(|e| *e != "[DONE]") {
            let v: Value = serde_json::from_str(event).unwrap();
            if v.get("error").is_some() {
                s.errors.push(v);
                continue;
            }
            assert!(s.errors.is_empty(), "nothing after an error");
            assert_eq!(v["object"], "chat.completion.chunk");
            assert_eq!(v["created"], CREATED);
            let id = v["id"].as_str().unwrap().to_string();
            assert!(s.id.is_empty() || s.id == id, "one id");
            s.id = id;
            s.model = v["model"].as_str().unwrap().to_string();
            assert_eq!(v.get("usage").is_some(), include_usage, "{event}");
            let choices = v["choices"].as_array().unwrap();
            if choices.is_empty() {
                assert!(v["usage"].is_object(), "{event}");
                s.usage_chunks.push(v["usage"].clone());
                continue;
            }
            if include_usage {
                assert!(v["usage"].is_null(), "{event}");
            }
            assert_eq!(choices.len(), 1);
            let choice = &choices[0];
            assert!(choice["logprobs"].is_null());
            let a = s
                .choices
                .entry(choice["index"].as_u64().unwrap())
                .or_default();
            assert!(
                a.finish_reasons.is_empty(),
                "nothing after the finish chunk"
            );
            if let Some(f) = choice["finish_reason"].as_str() {
                a.finish_reasons.push(f.to_string());
                assert_eq!(choice["delta"], json!({}));
            }
            let delta = &choice["delta"];
            if delta.get("role").is_some() {
                assert_eq!(delta["role"], "assistant");
                a.roles += 1;
            } else {
                assert_eq!(a.roles, 1, "role first");
            }
            if let Some(c) = delta["content"].as_str() {
                a.content.push_str(c);
            }
            if let Some(r) = delta["reasoning_content"].as_str() {
                a.reasoning.push_str(r);
            }
            if let Some(r) = delta["refusal"].as_str() {
                a.refusal.push_str(r);
            }
            for call in delta["tool_calls"].as_array().into_iter().flatten() {
                let index = call["index"].as_u64().unwrap();
                assert!(!a.tools.contains_key(&index), "each call whole, once");
                assert_eq!(call["type"], "function");
                a.tools.insert(
                    index,
                    (
                        call["id"].as_str().unwrap().to_string(),
                        call["function"]["name"].as_str().unwrap().to_string(),
                        call["function"]["arguments"].as_str().unwrap().to_string(),
                        call.get("extra_content").cloned().unwrap_or(Value::Null),
                    ),
                );
            }
        }
        s
    }

    /// All at once, byte by byte, split in two at every position, and event
    /// by event with several events merged in one chunk.
    fn assert_chunking_invariant(input: &[u8], include_usage: bool) -> Vec<u8> {
        let whole = run(input, include_usage);
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(run_pieces(&bytes, include_usage), whole, "byte by byte");
        for at in 0..=input.len() {
            let (a, b) = input.split_at(at);
            assert_eq!(run_pieces(&[a, b], include_usage), whole, "split at {at}");
        }
        for size in [7, 64, 333] {
            let pieces: Vec<&[u8]> = input.chunks(size).collect();
            assert_eq!(
                run_pieces(&pieces, include_usage),
                whole,
                "chunks of {size}"
            );
        }
        whole
    }

    #[test]
    fn text_stream_translates_identically_however_it_is_chunked() {
        for include_usage in [false, true] {
            let out = assert_chunking_invariant(TEXT_STREAM.as_bytes(), include_usage);
            let s = assemble(&out, include_usage);
            assert_eq!(s.id, "chatcmpl-mQkGaZ2bC9WQz7IPwKWS4Qo");
            assert_eq!(s.model, "gemini-2.5-flash");
            assert_eq!(s.choices.len(), 1);
            let a = &s.choices[&0];
            assert_eq!(a.roles, 1);
            assert_eq!(
                a.content,
                "Hello, café ☕ — ça va? 👋\nSecond line with \"quotes\"."
            );
            assert_eq!(a.reasoning, "The user wants a greeting. Keep it short.");
            assert!(a.tools.is_empty());
            assert_eq!(a.finish_reasons, vec!["stop"]);
            assert!(s.errors.is_empty());
            assert!(s.done_last);
            if include_usage {
                assert_eq!(
                    s.usage_chunks,
                    vec![json!({"prompt_tokens": 1204, "completion_tokens": 55,
                                "total_tokens": 1259,
                                "prompt_tokens_details": {"cached_tokens": 1024},
                                "completion_tokens_details": {"reasoning_tokens": 36}})]
                );
            } else {
                assert!(s.usage_chunks.is_empty());
            }
            let first: Value = serde_json::from_str(&data_events(&out)[0]).unwrap();
            assert_eq!(
                first["choices"][0]["delta"],
                json!({"role": "assistant", "content": ""})
            );
        }
    }

    #[test]
    fn parallel_tool_stream_keeps_whole_calls_and_indices_across_events() {
        for include_usage in [false, true] {
            let out = assert_chunking_invariant(TOOL_STREAM.as_bytes(), include_usage);
            let s = assemble(&out, include_usage);
            assert_eq!(s.model, "gemini-3-pro-preview");
            let a = &s.choices[&0];
            assert_eq!(a.content, "I'll look up the weather and the time in Paris.");
            assert_eq!(a.tools.keys().copied().collect::<Vec<_>>(), vec![0, 1, 2]);
            let expected = [
                (
                    "get_weather",
                    json!({"location": "Paris, France", "unit": "celsius"}),
                    json!({"google": {"thought_signature":
                        "EqMDCqADAdHtim9pPl1mT0ksv3Kq6A2Zk4R1sX9QeHw7Yv2Lr8Tu5Nc="}}),
                ),
                ("get_time", json!({"timezone": "Europe/Paris"}), Value::Null),
                (
                    "get_weather",
                    json!({"location": "Zürich \"ZH\"", "days": [1, 2],
                           "detail": {"hourly": false}}),
                    Value::Null,
                ),
            ];
            for (k, (name, args, extra)) in expected.iter().enumerate() {
                let (id, got_name, got_args, got_extra) = &a.tools[&(k as u64)];
                assert_eq!(id, &format!("call_{k}"));
                assert_eq!(got_name, name);
                assert_eq!(&serde_json::from_str::<Value>(got_args).unwrap(), args);
                assert_eq!(got_extra, extra);
            }
            assert_eq!(a.finish_reasons, vec!["tool_calls"]);
            assert!(s.done_last);
            assert!(s.errors.is_empty());
            let expected_usage = if include_usage {
                vec![
                    json!({"prompt_tokens": 108, "completion_tokens": 177, "total_tokens": 285,
                            "prompt_tokens_details": {"cached_tokens": 0},
                            "completion_tokens_details": {"reasoning_tokens": 119}}),
                ]
            } else {
                vec![]
            };
            assert_eq!(s.usage_chunks, expected_usage);
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
        assert_eq!(last_chunk["usage"]["total_tokens"], 1259);
        let finish: Value = serde_json::from_str(&events[n - 3]).unwrap();
        assert_eq!(finish["choices"][0]["finish_reason"], "stop");
        assert_eq!(finish["choices"][0]["delta"], json!({}));
    }

    #[test]
    fn usage_is_reported_to_the_filter() {
        let mut t = GeminiStreamToChat::new(false, "m", CREATED);
        assert_eq!(t.usage(), None);
        let mut out = Vec::new();
        t.push(TOOL_STREAM.as_bytes(), &mut out);
        assert_eq!(
            t.usage(),
            Some(Usage {
                input_tokens: 108,
                output_tokens: 177,
                cached_input_tokens: 0,
                reasoning_tokens: 119
            })
        );
        let mut t = GeminiStreamToChat::new(true, "m", CREATED);
        let first_event = TEXT_STREAM.split_inclusive("\r\n\r\n").next().unwrap();
        t.push(first_event.as_bytes(), &mut out);
        assert_eq!(
            t.usage(),
            Some(Usage {
                input_tokens: 1204,
                output_tokens: 0,
                cached_input_tokens: 1024,
                reasoning_tokens: 0
            })
        );
        t.push(TEXT_STREAM.as_bytes(), &mut out);
        assert_eq!(
            t.usage(),
            Some(Usage {
                input_tokens: 1204,
                output_tokens: 55,
                cached_input_tokens: 1024,
                reasoning_tokens: 36
            })
        );
    }

    /// Output appears as soon as the upstream event producing it completes;
    /// only the end (usage, [DONE]) waits for the end of the body.
    #[test]
    fn nothing_is_held_back() {
        for (fixture, sep) in [(TEXT_STREAM, "\r\n\r\n"), (TOOL_STREAM, "\n\n")] {
            let full = run(fixture.as_bytes(), true);
            let mut t = GeminiStreamToChat::new(true, "m", CREATED);
            let mut out = Vec::new();
            for event in fixture.split_inclusive(sep) {
                let before = out.len();
                // Hold back the second half of the blank line ending it.
                let (body, end) = event.split_at(event.len() - sep.len() / 2);
                t.push(body.as_bytes(), &mut out);
                assert_eq!(out.len(), before, "output before the event ended: {event}");
                t.push(end.as_bytes(), &mut out);
                assert!(out.len() > before, "{event}");
                assert!(full.starts_with(&out));
            }
            assert!(!out.ends_with(b"data: [DONE]\n\n"));
            t.finish(&mut out);
            assert_eq!(out, full);
        }
    }

    #[test]
    fn line_endings_do_not_matter() {
        for fixture in [TEXT_STREAM, TOOL_STREAM] {
            let lf = fixture.replace("\r\n", "\n");
            let expected = run(lf.as_bytes(), true);
            for ending in ["\r\n", "\r"] {
                let converted = lf.replace('\n', ending);
                assert_eq!(run(converted.as_bytes(), true), expected, "{ending:?}");
                let bytes: Vec<&[u8]> = converted.as_bytes().chunks(1).collect();
                assert_eq!(
                    run_pieces(&bytes, true),
                    expected,
                    "{ending:?} byte by byte"
                );
            }
        }
    }

    #[test]
    fn comments_are_ignored() {
        let plain = run(TOOL_STREAM.as_bytes(), false);
        let noisy = format!(": keep-alive\n\n{TOOL_STREAM}: bye\n\n");
        assert_eq!(run(noisy.as_bytes(), false), plain);
    }

    #[test]
    fn error_event_ends_the_stream_without_done() {
        let head: String = TEXT_STREAM.split_inclusive("\r\n\r\n").take(2).collect();
        let input = format!(
            "{head}data: {{\"error\": {{\"code\": 503, \"message\": \"The model is overloaded.\", \"status\": \"UNAVAILABLE\"}}}}\r\n\r\n\
             data: {{\"candidates\": [{{\"content\": {{\"parts\": [{{\"text\": \"late\"}}]}}, \"finishReason\": \"STOP\"}}]}}\r\n\r\n"
        );
        let mut t = GeminiStreamToChat::new(true, "m", CREATED);
        let mut out = Vec::new();
        t.push(input.as_bytes(), &mut out);
        let events = data_events(&out);
        assert!(!events.iter().any(|e| e == "[DONE]"));
        let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
        assert_eq!(
            last,
            json!({"error": {"message": "The model is overloaded.", "type": "server_error",
                             "param": null, "code": "overloaded"}})
        );
        let s = assemble(&out, true);
        assert_eq!(
            s.choices[&0].reasoning,
            "The user wants a greeting. Keep it short."
        );
        assert!(!s.choices[&0].content.contains("late"));
        let len = out.len();
        t.finish(&mut out);
        t.push(TEXT_STREAM.as_bytes(), &mut out);
        assert_eq!(out.len(), len, "nothing after an error");
    }

    #[test]
    fn truncated_stream_ends_with_an_interruption_error() {
        let events: Vec<&str> = TOOL_STREAM.split_inclusive("\n\n").collect();
        let cuts = [
            TOOL_STREAM.len() / 2,
            // Everything but the event with the finish reason.
            TOOL_STREAM.len() - events.last().unwrap().len(),
            // Inside the final event: its finish reason never completes.
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
                let s = assemble(&out, include_usage);
                assert!(s.usage_chunks.is_empty());
                assert!(s.choices.values().all(|c| c.finish_reasons.is_empty()));
            }
        }
    }

    #[test]
    fn finish_is_idempotent_and_silent_afterwards() {
        let mut t = GeminiStreamToChat::new(false, "m", CREATED);
        let mut out = Vec::new();
        t.push(TEXT_STREAM.as_bytes(), &mut out);
        t.finish(&mut out);
        let len = out.len();
        assert!(out.ends_with(b"data: [DONE]\n\n"));
        t.finish(&mut out);
        t.push(TEXT_STREAM.as_bytes(), &mut out);
        assert_eq!(out.len(), len);

        let mut t = GeminiStreamToChat::new(false, "m", CREATED);
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
    fn blocked_prompt_stream_is_a_filtered_answer() {
        let blocked: Value = serde_json::from_str(BLOCKED_RESPONSE).unwrap();
        let input = format!("data: {blocked}\r\n\r\n");
        let out = run(input.as_bytes(), true);
        let s = assemble(&out, true);
        let a = &s.choices[&0];
        assert!(a.refusal.contains("PROHIBITED_CONTENT"), "{}", a.refusal);
        assert_eq!(a.finish_reasons, vec!["content_filter"]);
        assert!(a.content.is_empty());
        assert!(s.done_last);
        assert_eq!(s.usage_chunks[0]["prompt_tokens"], 14);
    }

    #[test]
    fn several_candidates_stream_as_several_choices() {
        let event = |body: Value| format!("data: {body}\n\n");
        let input = [
            event(json!({"candidates": [
                {"content": {"parts": [{"text": "A1"}]}, "index": 0},
                {"content": {"parts": [{"text": "B1"}]}, "index": 1}]})),
            event(json!({"candidates": [
                {"content": {"parts": [{"functionCall": {"name": "f", "args": {}}}]},
                 "finishReason": "STOP", "index": 1}]})),
            event(json!({"candidates": [
                {"content": {"parts": [{"text": "A2"}]}, "finishReason": "MAX_TOKENS",
                 "index": 0}],
                "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 9}})),
        ]
        .concat();
        let out = run(input.as_bytes(), true);
        let s = assemble(&out, true);
        assert_eq!(s.model, "gemini-requested");
        assert_eq!(s.choices[&0].content, "A1A2");
        assert_eq!(s.choices[&0].finish_reasons, vec!["length"]);
        assert_eq!(s.choices[&1].content, "B1");
        assert_eq!(s.choices[&1].tools[&0].0, "call_0");
        assert_eq!(s.choices[&1].finish_reasons, vec!["tool_calls"]);
        assert!(s.done_last);
        assert_eq!(s.usage_chunks[0]["total_tokens"], 14);

        // One candidate never finished: the stream is incomplete.
        let cut: String = input.split_inclusive("\n\n").take(2).collect();
        let s = assemble(&run(cut.as_bytes(), false), false);
        assert!(!s.done_last);
        assert_eq!(s.errors.len(), 1);
    }

    #[test]
    fn content_after_a_finish_is_not_shown() {
        let input = "data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"a\"}]},\"finishReason\":\"STOP\"}]}\n\n\
                     data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"b\"}]}}],\"usageMetadata\":{\"promptTokenCount\":3,\"candidatesTokenCount\":2}}\n\n";
        let out = run(input.as_bytes(), true);
        let s = assemble(&out, true);
        assert_eq!(s.choices[&0].content, "a");
        assert!(s.done_last);
        assert_eq!(s.usage_chunks[0]["total_tokens"], 5);
    }

    #[test]
    fn chained_translators_keep_usage() {
        use crate::translate::Chain;
        struct Identity;
        impl StreamTranslator for Identity {
            fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
                out.extend_from_slice(chunk);
            }
            fn finish(&mut self, _out: &mut Vec<u8>) {}
            fn usage(&self) -> Option<Usage> {
                None
            }
        }
        let mut chain = Chain::new(GeminiStreamToChat::new(false, "m", CREATED), Identity);
        let mut out = Vec::new();
        chain.push(TEXT_STREAM.as_bytes(), &mut out);
        chain.finish(&mut out);
        assert!(out.ends_with(b"data: [DONE]\n\n"));
        assert_eq!(chain.usage().map(|u| u.reasoning_tokens), Some(36));
    }
}
