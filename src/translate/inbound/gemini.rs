//! Gemini API callers (the `google-genai` SDKs, `POST
//! /v1beta/models/{model}:generateContent` and `:streamGenerateContent?alt=sse`,
//! also under `/v1/`) reaching a provider through the OpenAI Chat Completions
//! pivot.
//!
//! * [`gemini_request_to_chat`]: the caller's `GenerateContentRequest`
//!   rewritten as a chat completions request. The model and the stream flag
//!   come from the URL, which the filter parses.
//! * [`chat_response_to_gemini`]: a `chat.completion` back into a
//!   `GenerateContentResponse`.
//! * [`ChatStreamToGemini`]: `chat.completion.chunk` events into Gemini's
//!   stream, one `data: {GenerateContentResponse}\r\n\r\n` event at a time.
//! * [`error_body`], [`chat_error_to_gemini`]: errors in Google's shape,
//!   `{"error":{"code","message","status","details"}}`.
//!
//! Field names: the REST API takes proto3 JSON, where both the lowerCamelCase
//! and the original snake_case spelling of every field are accepted, and
//! `google-genai` (Python) really sends both: top-level and part fields in
//! camelCase, but values it passes through from its pydantic models in
//! snake_case (`thinkingConfig: {"thinking_budget": ..}`,
//! `functionResponse: {"name", "response", "will_continue"}`, function
//! declarations and their schemas: `parameters_json_schema`, `any_of`,
//! `max_items`). So every field name is read in either spelling. Only field
//! names are normalised, never user data (schema property names, function
//! arguments and responses are kept verbatim).
//!
//! Decisions, where Gemini and OpenAI differ:
//! * Consecutive `model` contents become one assistant message (text
//!   concatenated, calls in order): google-genai's chat sessions record a
//!   streamed answer as one content per chunk, and OpenAI wants an
//!   assistant's tool calls in one message, right before their results.
//! * `functionResponse` parts of a user turn become `tool` messages placed
//!   before the turn's other parts (OpenAI wants tool results right after the
//!   assistant message that called them). A response is matched to the call
//!   with the same `id`, else to the first unanswered call with the same
//!   name; calls without an `id` get `call_<turn>_<n>` (content index, call
//!   number within that turn), the same on every request, so a history
//!   replayed across requests keeps its ids.
//! * `toolConfig.functionCallingConfig`: `AUTO` -> `auto`, `NONE` -> `none`,
//!   `ANY` -> `required`, `VALIDATED` -> `auto` (OpenAI has no "validated"
//!   mode; the schemas are still sent). `allowedFunctionNames` (only with
//!   `ANY` or `VALIDATED`, as Gemini requires): one name with `ANY` -> a named
//!   `tool_choice`; otherwise the declared tools are narrowed to the allowed
//!   names, which is exactly Gemini's meaning ("limits the functions the
//!   model will call"), with `required` / `auto`.
//! * `thinkingConfig.thinkingBudget` -> `reasoning_effort`: 1..=2048 `low`,
//!   ..=8192 `medium`, above `high` (so the Anthropic translator's budgets
//!   1024/4096/16384 map back to the same effort); `0` (thinking off) and
//!   `-1` (dynamic) -> omitted, leaving the provider's default.
//!   `thinkingLevel` MINIMAL/LOW/MEDIUM/HIGH -> the same effort.
//!   `includeThoughts` is accepted but cannot be enforced: the responses do
//!   not know the request, so reasoning the provider returns always becomes
//!   `thought: true` parts (which `response.text` skips).
//! * Accepted and dropped, since they only restrict or tune and OpenAI has no
//!   counterpart: `safetySettings`, `mediaResolution` (the provider's default
//!   image resolution is used), `thoughtSignature`, `partMetadata`,
//!   `labels`, function declarations' `response`/`responseJsonSchema`/
//!   `behavior`, `toolConfig.retrievalConfig`. Thought parts in model turns
//!   are dropped (OpenAI takes no reasoning back).
//! * Everything else without an OpenAI counterpart (`topK`, built-in tools,
//!   non-image media, Files API and `gs://` URIs, `cachedContent`, audio or
//!   image output, logprobs, ...) is a 400 with code `unsupported_parameter`.
//!
//! Streaming: every chunk with text or reasoning becomes one Gemini event
//! (role `model`); tool-call arguments are gathered and each `functionCall`
//! is sent whole once complete (the next call index of its choice starts, or
//! the choice finishes). `google-genai`'s chat sessions drop a turn from
//! their history when any chunk lacks `candidates[0].content.parts`, so
//! every event carries a part (`{"text": ""}` when there is nothing else),
//! and, as Google does, the finishing event and the usage are sent together:
//! an event with a `finish_reason` waits for the next upstream event (the
//! usage chunk or `[DONE]`) to be merged with it. The stream is framed like
//! Google's (`data: <json>\r\n\r\n`, no comments: the SDK reads every line
//! not starting with `data: ` as raw JSON). A pivot error event, or an
//! upstream that ends without `[DONE]`, ends the stream with
//! `data: {"error":{"code","message","status"}}`: `google-genai` checks each
//! chunk for a leading `error` key and raises `errors.ClientError` (4xx) or
//! `errors.ServerError` (5xx) from the iterator.

use std::borrow::Cow;

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

/// The largest thinking budgets for the `low` and `medium` efforts.
const LOW_BUDGET_MAX: i64 = 2048;
const MEDIUM_BUDGET_MAX: i64 = 8192;
/// Image file extensions accepted when a `fileData` part has no `mimeType`.
const IMAGE_EXTENSIONS: [&str; 6] = ["png", "jpg", "jpeg", "gif", "webp", "heic"];
/// `fileUri`s of the Gemini Files API, which only Google can read.
const FILES_API_PREFIX: &str = "https://generativelanguage.googleapis.com/";

// ---------------------------------------------------------------------------
// Field access: camelCase or snake_case
// ---------------------------------------------------------------------------

/// A proto3 JSON field name in lowerCamelCase (`thinking_budget` ->
/// `thinkingBudget`); names without `_` are returned as they are.
fn camel(key: &str) -> Cow<'_, str> {
    if !key.contains('_') {
        return Cow::Borrowed(key);
    }
    let mut out = String::with_capacity(key.len());
    let mut upper = false;
    for c in key.chars() {
        if c == '_' {
            upper = !out.is_empty();
            continue;
        }
        if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// The fields of `o` that are not null, with their names in camelCase.
fn fields(o: &Map<String, Value>) -> impl Iterator<Item = (Cow<'_, str>, &Value)> {
    o.iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (camel(k), v))
}

/// The field `name` (given in camelCase) of `o`, in either spelling; null is absent.
fn get<'a>(o: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    fields(o).find(|(k, _)| k == name).map(|(_, v)| v)
}

fn get_str<'a>(o: &'a Map<String, Value>, name: &str) -> Option<&'a str> {
    get(o, name).and_then(Value::as_str)
}

// ---------------------------------------------------------------------------
// Caller errors
// ---------------------------------------------------------------------------

fn invalid_type(param: &'static str, what: &str, want: &str, got: &Value) -> ApiError {
    ApiError::invalid_request(
        Some("invalid_type"),
        format!(
            "Invalid type for '{what}': expected {want}, but got {}.",
            json_type(got)
        ),
    )
    .with_param(param)
}

fn bad_content(message: String) -> ApiError {
    invalid_value("contents", message)
}

fn has_prefix_ignore_case(s: &str, prefix: &str) -> bool {
    s.get(..prefix.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
}

// ---------------------------------------------------------------------------
// Request: Gemini GenerateContentRequest -> OpenAI chat completions
// ---------------------------------------------------------------------------

/// A function call of a model turn, waiting for its response.
struct Call {
    id: String,
    name: String,
    answered: bool,
}

/// What the contents are turned into.
#[derive(Default)]
struct Conversation {
    messages: Vec<Value>,
    calls: Vec<Call>,
}

/// The text of a text part, if `part` is one.
fn part_text<'a>(
    part: &'a Map<String, Value>,
    at: &dyn Fn() -> String,
) -> Result<Option<&'a str>, ApiError> {
    match get(part, "text") {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(bad_content(format!(
            "{}.text must be a string, not {}.",
            at(),
            json_type(other)
        ))),
    }
}

/// An OpenAI `image_url` content part for an inline base64 image.
fn inline_image(blob: &Value, at: &str) -> Result<Value, ApiError> {
    let Some(blob) = blob.as_object() else {
        return Err(bad_content(format!("{at}.inlineData must be an object.")));
    };
    let mime = get_str(blob, "mimeType")
        .ok_or_else(|| bad_content(format!("{at}.inlineData has no string 'mimeType'.")))?;
    let data = get_str(blob, "data")
        .ok_or_else(|| bad_content(format!("{at}.inlineData has no string 'data'.")))?;
    if !has_prefix_ignore_case(mime, "image/") {
        return Err(unsupported(
            "contents",
            format!(
                "{at}.inlineData: the mime type '{mime}' is not supported by this provider \
                 through this gateway; only images (image/*) can be sent inline."
            ),
        ));
    }
    // google-genai encodes bytes with the URL-safe base64 alphabet, which
    // Google accepts; data URLs want the standard one.
    let data: String = data
        .chars()
        .map(|c| match c {
            '-' => '+',
            '_' => '/',
            c => c,
        })
        .collect();
    Ok(json!({
        "type": "image_url",
        "image_url": {"url": format!("data:{};base64,{data}", mime.to_ascii_lowercase())}
    }))
}

/// Whether the path of `uri` ends with an image file extension.
fn looks_like_image(uri: &str) -> bool {
    let path = uri.split(['?', '#']).next().unwrap_or_default();
    let ext = path.rsplit_once('.').map(|(_, e)| e).unwrap_or_default();
    IMAGE_EXTENSIONS.iter().any(|e| e.eq_ignore_ascii_case(ext))
}

/// An OpenAI `image_url` content part for an image the provider can fetch.
fn file_image(file: &Value, at: &str) -> Result<Value, ApiError> {
    let Some(file) = file.as_object() else {
        return Err(bad_content(format!("{at}.fileData must be an object.")));
    };
    let uri = get_str(file, "fileUri")
        .ok_or_else(|| bad_content(format!("{at}.fileData has no string 'fileUri'.")))?;
    let mime = get_str(file, "mimeType");
    if has_prefix_ignore_case(uri, FILES_API_PREFIX) {
        return Err(unsupported(
            "contents",
            format!(
                "{at}.fileData: files uploaded to the Gemini Files API cannot be read by this \
                 provider; send the image inline (inlineData) or as a public https URL."
            ),
        ));
    }
    if !has_prefix_ignore_case(uri, "https://") && !has_prefix_ignore_case(uri, "http://") {
        return Err(unsupported(
            "contents",
            format!(
                "{at}.fileData: the URI '{uri}' is not supported by this provider through this \
                 gateway; only public http(s) image URLs are (not gs:// or other schemes)."
            ),
        ));
    }
    let image = match mime {
        Some(m) => has_prefix_ignore_case(m, "image/"),
        None => looks_like_image(uri),
    };
    if !image {
        return Err(unsupported(
            "contents",
            format!(
                "{at}.fileData: the file '{uri}' (mime type '{}') is not supported by this \
                 provider through this gateway; only images (image/*) are.",
                mime.unwrap_or("unknown")
            ),
        ));
    }
    Ok(json!({"type": "image_url", "image_url": {"url": uri}}))
}

/// Part fields that carry nothing OpenAI needs and are dropped.
fn ignored_part_field(name: &str) -> bool {
    matches!(
        name,
        // Opaque signature Google's own models need; reasoning is not sent back.
        "thoughtSignature"
        // Per-part resolution hint and metadata only the caller uses.
        | "mediaResolution"
        | "partMetadata"
    )
}

fn unsupported_part(at: &str, name: &str) -> ApiError {
    unsupported(
        "contents",
        format!(
            "{at}.{name}: parts of this kind are not supported by this provider through this \
             gateway; use text, inlineData or fileData images, functionCall and \
             functionResponse."
        ),
    )
}

impl Conversation {
    fn user_turn(&mut self, i: usize, parts: &[Value]) -> Result<(), ApiError> {
        let mut content: Vec<Value> = Vec::new();
        for (j, part) in parts.iter().enumerate() {
            let at = format!("contents[{i}].parts[{j}]");
            let Some(part) = part.as_object() else {
                return Err(bad_content(format!("{at} must be an object.")));
            };
            for (name, value) in fields(part) {
                match name.as_ref() {
                    "text" => {
                        let text = part_text(part, &|| at.clone())?.unwrap_or_default();
                        content.push(json!({"type": "text", "text": text}));
                    }
                    "inlineData" => content.push(inline_image(value, &at)?),
                    "fileData" => content.push(file_image(value, &at)?),
                    "functionResponse" => self.function_response(value, &at)?,
                    "functionCall" => {
                        return Err(bad_content(format!(
                            "{at}: functionCall parts belong in turns with the role 'model'."
                        )))
                    }
                    // A flag on a text part; in a user turn the text is plain input.
                    "thought" => {}
                    n if ignored_part_field(n) => {}
                    n => return Err(unsupported_part(&at, n)),
                }
            }
        }
        if content.is_empty() {
            return Ok(());
        }
        let only_text = match content.as_slice() {
            [one] => one.get("text").and_then(Value::as_str).map(str::to_string),
            _ => None,
        };
        let content = match only_text {
            Some(text) => Value::String(text),
            None => Value::Array(content),
        };
        self.messages
            .push(json!({"role": "user", "content": content}));
        Ok(())
    }

    fn function_response(&mut self, value: &Value, at: &str) -> Result<(), ApiError> {
        let Some(fr) = value.as_object() else {
            return Err(bad_content(format!(
                "{at}.functionResponse must be an object."
            )));
        };
        let name = get_str(fr, "name")
            .ok_or_else(|| bad_content(format!("{at}.functionResponse has no string 'name'.")))?;
        if get(fr, "parts").is_some_and(|p| p.as_array().is_none_or(|a| !a.is_empty())) {
            return Err(unsupported(
                "contents",
                format!(
                    "{at}.functionResponse.parts: multimodal function responses are not \
                     supported by this provider through this gateway."
                ),
            ));
        }
        let id = get_str(fr, "id");
        let unanswered = |c: &&mut Call| !c.answered;
        let by_id = id.and_then(|id| {
            self.calls
                .iter_mut()
                .filter(unanswered)
                .position(|c| c.id == id)
        });
        let index = by_id.or_else(|| {
            self.calls
                .iter_mut()
                .filter(unanswered)
                .position(|c| c.name == name)
        });
        // `position` counted unanswered calls only: find the real one.
        let call = index.and_then(|n| self.calls.iter_mut().filter(|c| !c.answered).nth(n));
        let Some(call) = call else {
            return Err(bad_content(format!(
                "{at}.functionResponse: no earlier functionCall named '{name}' is waiting for \
                 a response."
            )));
        };
        call.answered = true;
        let response = match get(fr, "response") {
            None => "{}".to_string(),
            Some(v) => serde_json::to_string(v).unwrap_or_default(),
        };
        self.messages.push(json!({
            "role": "tool",
            "tool_call_id": call.id,
            "content": response,
        }));
        Ok(())
    }

    fn model_turn(&mut self, i: usize, parts: &[Value]) -> Result<(), ApiError> {
        let mut text: Option<String> = None;
        let mut tool_calls: Vec<Value> = Vec::new();
        for (j, part) in parts.iter().enumerate() {
            let at = format!("contents[{i}].parts[{j}]");
            let Some(part) = part.as_object() else {
                return Err(bad_content(format!("{at} must be an object.")));
            };
            let thought = get(part, "thought").and_then(Value::as_bool) == Some(true);
            for (name, value) in fields(part) {
                match name.as_ref() {
                    "text" => {
                        let t = part_text(part, &|| at.clone())?.unwrap_or_default();
                        // OpenAI takes no reasoning back: thoughts are dropped.
                        if !thought {
                            text.get_or_insert_with(String::new).push_str(t);
                        }
                    }
                    "functionCall" => {
                        let n = tool_calls.len();
                        tool_calls.push(self.function_call(value, &at, i, n)?);
                    }
                    "functionResponse" => {
                        return Err(bad_content(format!(
                            "{at}: functionResponse parts belong in turns with the role 'user'."
                        )))
                    }
                    "thought" => {}
                    n if ignored_part_field(n) => {}
                    n => return Err(unsupported_part(&at, n)),
                }
            }
        }
        let text = text.filter(|t| !t.is_empty());
        if text.is_none() && tool_calls.is_empty() {
            // Only thoughts: nothing OpenAI can take.
            return Ok(());
        }
        // google-genai records a streamed answer as one model content per
        // chunk: consecutive model contents are one assistant message, or
        // its tool calls would be split from their results.
        if let Some(Value::Object(last)) = self.messages.last_mut() {
            if last.get("role").and_then(Value::as_str) == Some("assistant") {
                if let Some(t) = text {
                    match last.get_mut("content") {
                        Some(Value::String(s)) => s.push_str(&t),
                        _ => {
                            last.insert("content".into(), Value::String(t));
                        }
                    }
                }
                if !tool_calls.is_empty() {
                    match last.get_mut("tool_calls") {
                        Some(Value::Array(calls)) => calls.extend(tool_calls),
                        _ => {
                            last.insert("tool_calls".into(), Value::Array(tool_calls));
                        }
                    }
                }
                return Ok(());
            }
        }
        let mut message = Map::new();
        message.insert("role".into(), Value::String("assistant".into()));
        message.insert("content".into(), text.map_or(Value::Null, Value::String));
        if !tool_calls.is_empty() {
            message.insert("tool_calls".into(), Value::Array(tool_calls));
        }
        self.messages.push(Value::Object(message));
        Ok(())
    }

    fn function_call(
        &mut self,
        value: &Value,
        at: &str,
        turn: usize,
        n: usize,
    ) -> Result<Value, ApiError> {
        let Some(fc) = value.as_object() else {
            return Err(bad_content(format!("{at}.functionCall must be an object.")));
        };
        let name = get_str(fc, "name")
            .ok_or_else(|| bad_content(format!("{at}.functionCall has no string 'name'.")))?;
        let id = match get_str(fc, "id") {
            Some(id) if !id.is_empty() => id.to_string(),
            _ => format!("call_{turn}_{n}"),
        };
        let args = match get(fc, "args") {
            None => "{}".to_string(),
            Some(args @ Value::Object(_)) => serde_json::to_string(args).unwrap_or_default(),
            Some(other) => {
                return Err(bad_content(format!(
                    "{at}.functionCall.args must be an object, not {}.",
                    json_type(other)
                )))
            }
        };
        self.calls.push(Call {
            id: id.clone(),
            name: name.to_string(),
            answered: false,
        });
        Ok(json!({
            "id": id,
            "type": "function",
            "function": {"name": name, "arguments": args},
        }))
    }
}

/// The text of `systemInstruction`: a Content whose parts are text, or a string.
fn system_text(value: &Value) -> Result<String, ApiError> {
    let bad = |message: String| invalid_value("systemInstruction", message);
    let parts = match value {
        Value::String(s) => return Ok(s.clone()),
        Value::Object(o) => match get(o, "parts") {
            Some(Value::Array(parts)) => parts,
            _ => return Err(bad("systemInstruction has no 'parts' array.".into())),
        },
        other => {
            return Err(invalid_type(
                "systemInstruction",
                "systemInstruction",
                "a Content object",
                other,
            ))
        }
    };
    let mut texts = Vec::new();
    for (j, part) in parts.iter().enumerate() {
        let Some(part) = part.as_object() else {
            return Err(bad(format!(
                "systemInstruction.parts[{j}] must be an object."
            )));
        };
        for (name, value) in fields(part) {
            match name.as_ref() {
                "text" => match value {
                    Value::String(s) => texts.push(s.as_str()),
                    other => {
                        return Err(bad(format!(
                            "systemInstruction.parts[{j}].text must be a string, not {}.",
                            json_type(other)
                        )))
                    }
                },
                "thought" => {}
                n if ignored_part_field(n) => {}
                n => {
                    return Err(unsupported(
                        "systemInstruction",
                        format!(
                            "systemInstruction.parts[{j}].{n}: only text parts are supported in \
                             the system instruction by this provider through this gateway."
                        ),
                    ))
                }
            }
        }
    }
    Ok(texts.join("\n"))
}

fn convert_contents(contents: &[Value], conv: &mut Conversation) -> Result<(), ApiError> {
    for (i, content) in contents.iter().enumerate() {
        let Some(c) = content.as_object() else {
            return Err(bad_content(format!(
                "contents[{i}] must be an object, not {}.",
                json_type(content)
            )));
        };
        let parts = match get(c, "parts") {
            Some(Value::Array(parts)) if !parts.is_empty() => parts,
            Some(Value::Array(_)) => {
                return Err(bad_content(format!(
                    "contents[{i}].parts must not be empty."
                )))
            }
            _ => return Err(bad_content(format!("contents[{i}] has no 'parts' array."))),
        };
        // Gemini's default role is "user"; "function" is the older role of
        // turns holding function responses.
        match get_str(c, "role").unwrap_or("user") {
            "user" | "function" | "" => conv.user_turn(i, parts)?,
            "model" => conv.model_turn(i, parts)?,
            other => {
                return Err(bad_content(format!(
                    "contents[{i}].role must be 'user' or 'model', not '{other}'."
                )))
            }
        }
    }
    Ok(())
}

/// A Gemini `Schema` (OpenAPI subset, upper-case type names, snake_case
/// field names from google-genai) as a JSON Schema.
fn gemini_schema(schema: &Value) -> Value {
    let Value::Object(o) = schema else {
        return schema.clone();
    };
    let mut out = Map::new();
    let mut nullable = false;
    for (name, value) in fields(o) {
        match name.as_ref() {
            "type" => match value.as_str() {
                Some(t) if t.eq_ignore_ascii_case("TYPE_UNSPECIFIED") => {}
                Some(t) => {
                    out.insert("type".into(), Value::String(t.to_ascii_lowercase()));
                }
                None => {
                    out.insert("type".into(), value.clone());
                }
            },
            "nullable" => nullable = value.as_bool() == Some(true),
            // Gemini-only output ordering hint.
            "propertyOrdering" => {}
            // Maps from a name to a schema: the names are user data.
            "properties" | "defs" | "$defs" => {
                let map = match value {
                    Value::Object(m) => Value::Object(
                        m.iter()
                            .map(|(k, v)| (k.clone(), gemini_schema(v)))
                            .collect(),
                    ),
                    other => other.clone(),
                };
                let key = if name == "defs" {
                    "$defs"
                } else {
                    name.as_ref()
                };
                out.insert(key.to_string(), map);
            }
            "items" | "additionalProperties" | "not" => {
                out.insert(name.into_owned(), gemini_schema(value));
            }
            "anyOf" | "oneOf" | "allOf" | "prefixItems" => {
                let list = match value {
                    Value::Array(a) => Value::Array(a.iter().map(gemini_schema).collect()),
                    other => other.clone(),
                };
                out.insert(name.into_owned(), list);
            }
            // int64 fields, which proto3 JSON may write as strings.
            "minItems" | "maxItems" | "minLength" | "maxLength" | "minProperties"
            | "maxProperties" => {
                let n = value
                    .as_str()
                    .and_then(|s| s.parse::<u64>().ok())
                    .map_or_else(|| value.clone(), Value::from);
                out.insert(name.into_owned(), n);
            }
            "ref" => {
                out.insert("$ref".into(), value.clone());
            }
            _ => {
                out.insert(name.into_owned(), value.clone());
            }
        }
    }
    if nullable {
        if let Some(Value::String(t)) = out.get("type") {
            let t = t.clone();
            out.insert("type".into(), json!([t, "null"]));
        } else if let Some(Value::Array(any)) = out.get_mut("anyOf") {
            any.push(json!({"type": "null"}));
        }
        if let Some(Value::Array(values)) = out.get_mut("enum") {
            if !values.contains(&Value::Null) {
                values.push(Value::Null);
            }
        }
    }
    Value::Object(out)
}

fn convert_declaration(decl: &Value, i: usize, k: usize) -> Result<Value, ApiError> {
    let at = format!("tools[{i}].functionDeclarations[{k}]");
    let bad = |what: &str| invalid_value("tools", format!("{at} {what}."));
    let Some(d) = decl.as_object() else {
        return Err(bad("must be an object"));
    };
    let name = get_str(d, "name").ok_or_else(|| bad("has no string 'name'"))?;
    let mut function = Map::new();
    function.insert("name".into(), Value::String(name.to_string()));
    match get(d, "description") {
        None => {}
        Some(Value::String(s)) => {
            function.insert("description".into(), Value::String(s.clone()));
        }
        Some(_) => return Err(bad("has a 'description' that is not a string")),
    }
    let parameters = match (get(d, "parameters"), get(d, "parametersJsonSchema")) {
        (Some(_), Some(_)) => {
            return Err(bad(
                "sets both 'parameters' and 'parametersJsonSchema'; set only one",
            ))
        }
        (Some(p @ Value::Object(_)), None) => Some(gemini_schema(p)),
        (Some(_), None) => return Err(bad("has 'parameters' that is not an object")),
        (None, Some(p)) => Some(p.clone()),
        (None, None) => None,
    };
    if let Some(p) = parameters {
        function.insert("parameters".into(), p);
    }
    // `response`, `responseJsonSchema` (the function's output) and
    // `behavior` (Live API scheduling) have no OpenAI counterpart.
    Ok(json!({"type": "function", "function": function}))
}

fn convert_tools(tools: &Value) -> Result<Vec<Value>, ApiError> {
    let Value::Array(tools) = tools else {
        return Err(invalid_type("tools", "tools", "an array", tools));
    };
    let mut out = Vec::new();
    for (i, tool) in tools.iter().enumerate() {
        let Some(tool) = tool.as_object() else {
            return Err(invalid_value(
                "tools",
                format!("tools[{i}] must be an object."),
            ));
        };
        for (name, value) in fields(tool) {
            if name == "functionDeclarations" {
                let Value::Array(decls) = value else {
                    return Err(invalid_value(
                        "tools",
                        format!("tools[{i}].functionDeclarations must be an array."),
                    ));
                };
                for (k, decl) in decls.iter().enumerate() {
                    out.push(convert_declaration(decl, i, k)?);
                }
            } else {
                return Err(unsupported(
                    "tools",
                    format!(
                        "tools[{i}].{name}: Gemini's built-in tools are not supported by this \
                         provider through this gateway; only functionDeclarations are."
                    ),
                ));
            }
        }
    }
    Ok(out)
}

fn tool_name(tool: &Value) -> Option<&str> {
    tool.pointer("/function/name").and_then(Value::as_str)
}

/// Applies `toolConfig` to the tools; returns the `tool_choice`.
fn convert_tool_config(config: &Value, tools: &mut Vec<Value>) -> Result<Option<Value>, ApiError> {
    let bad = |message: String| invalid_value("toolConfig", message);
    let Some(config) = config.as_object() else {
        return Err(bad("toolConfig must be an object.".into()));
    };
    // `retrievalConfig` only serves Google's built-in tools, which are
    // refused anyway; `includeServerSideToolInvocations` likewise.
    let Some(fcc) = get(config, "functionCallingConfig") else {
        return Ok(None);
    };
    let Some(fcc) = fcc.as_object() else {
        return Err(bad(
            "toolConfig.functionCallingConfig must be an object.".into()
        ));
    };
    let mode = match get(fcc, "mode") {
        None => "MODE_UNSPECIFIED".to_string(),
        Some(Value::String(m)) => m.to_ascii_uppercase(),
        Some(other) => {
            return Err(invalid_type(
                "toolConfig",
                "toolConfig.functionCallingConfig.mode",
                "a string",
                other,
            ))
        }
    };
    let allowed: Vec<&str> = match get(fcc, "allowedFunctionNames") {
        None => Vec::new(),
        Some(Value::Array(names)) => names
            .iter()
            .map(|n| {
                n.as_str().ok_or_else(|| {
                    invalid_type(
                        "toolConfig",
                        "toolConfig.functionCallingConfig.allowedFunctionNames",
                        "an array of strings",
                        n,
                    )
                })
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(invalid_type(
                "toolConfig",
                "toolConfig.functionCallingConfig.allowedFunctionNames",
                "an array of strings",
                other,
            ))
        }
    };
    let choice = match mode.as_str() {
        "MODE_UNSPECIFIED" | "AUTO" | "VALIDATED" => "auto",
        "ANY" => "required",
        "NONE" => "none",
        other => {
            return Err(bad(format!(
                "Invalid toolConfig.functionCallingConfig.mode '{other}': use AUTO, ANY, NONE \
                 or VALIDATED."
            )))
        }
    };
    if !allowed.is_empty() {
        if mode != "ANY" && mode != "VALIDATED" {
            return Err(bad(
                "toolConfig.functionCallingConfig.allowedFunctionNames may only be set when \
                 the mode is ANY or VALIDATED."
                    .into(),
            ));
        }
        if let Some(missing) = allowed
            .iter()
            .find(|n| !tools.iter().any(|t| tool_name(t) == Some(n)))
        {
            return Err(bad(format!(
                "toolConfig.functionCallingConfig.allowedFunctionNames names '{missing}', \
                 which no functionDeclaration declares."
            )));
        }
        if let ([one], "ANY") = (allowed.as_slice(), mode.as_str()) {
            return Ok(Some(json!({"type": "function", "function": {"name": one}})));
        }
        tools.retain(|t| tool_name(t).is_some_and(|n| allowed.contains(&n)));
    }
    if tools.is_empty() {
        if choice == "required" {
            return Err(bad(
                "toolConfig.functionCallingConfig.mode ANY requires functionDeclarations in \
                 'tools'."
                    .into(),
            ));
        }
        return Ok(None);
    }
    if mode == "MODE_UNSPECIFIED" {
        return Ok(None);
    }
    Ok(Some(Value::String(choice.to_string())))
}

/// What `generationConfig` becomes.
#[derive(Default)]
struct Generation<'a> {
    temperature: Option<&'a Value>,
    top_p: Option<&'a Value>,
    max_tokens: Option<u64>,
    stop: Vec<&'a str>,
    n: Option<u64>,
    seed: Option<&'a Value>,
    presence_penalty: Option<&'a Value>,
    frequency_penalty: Option<&'a Value>,
    response_format: Option<Value>,
    reasoning_effort: Option<&'static str>,
}

fn number<'a>(param: &'static str, what: &str, v: &'a Value) -> Result<&'a Value, ApiError> {
    match v {
        Value::Number(_) => Ok(v),
        other => Err(invalid_type(param, what, "a number", other)),
    }
}

/// A positive integer; proto3 JSON allows 64-bit integers as strings.
fn positive(param: &'static str, what: &str, v: &Value) -> Result<u64, ApiError> {
    let n = v
        .as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()));
    match n {
        Some(0) => Err(invalid_value(
            param,
            format!("'{what}' must be at least 1."),
        )),
        Some(n) => Ok(n),
        None => Err(invalid_type(param, what, "a positive integer", v)),
    }
}

fn thinking_effort(config: &Value) -> Result<Option<&'static str>, ApiError> {
    const P: &str = "generationConfig.thinkingConfig";
    let Some(config) = config.as_object() else {
        return Err(invalid_type(P, P, "an object", config));
    };
    let budget = match get(config, "thinkingBudget") {
        None => None,
        Some(v) => Some(v.as_i64().ok_or_else(|| {
            invalid_type(
                P,
                "generationConfig.thinkingConfig.thinkingBudget",
                "an integer",
                v,
            )
        })?),
    };
    let level = match get(config, "thinkingLevel") {
        None => None,
        Some(Value::String(s)) => Some(s.to_ascii_uppercase()),
        Some(other) => {
            return Err(invalid_type(
                P,
                "generationConfig.thinkingConfig.thinkingLevel",
                "a string",
                other,
            ))
        }
    };
    // `includeThoughts`: see the module documentation.
    match (budget, level) {
        (Some(_), Some(_)) => Err(invalid_value(
            P,
            "Set only one of thinkingConfig.thinkingBudget and thinkingConfig.thinkingLevel."
                .into(),
        )),
        // 0 turns thinking off and -1 lets the model decide: the provider's
        // default is the closest OpenAI has.
        (Some(0 | -1), None) | (None, None) => Ok(None),
        (Some(b), None) if b < -1 => Err(invalid_value(
            P,
            format!("thinkingConfig.thinkingBudget must be -1, 0 or positive, not {b}."),
        )),
        (Some(b), None) if b <= LOW_BUDGET_MAX => Ok(Some("low")),
        (Some(b), None) if b <= MEDIUM_BUDGET_MAX => Ok(Some("medium")),
        (Some(_), None) => Ok(Some("high")),
        (None, Some(level)) => match level.as_str() {
            "THINKING_LEVEL_UNSPECIFIED" => Ok(None),
            "MINIMAL" => Ok(Some("minimal")),
            "LOW" => Ok(Some("low")),
            "MEDIUM" => Ok(Some("medium")),
            "HIGH" => Ok(Some("high")),
            other => Err(invalid_value(
                P,
                format!(
                    "Invalid thinkingConfig.thinkingLevel '{other}': use MINIMAL, LOW, MEDIUM \
                     or HIGH."
                ),
            )),
        },
    }
}

fn convert_generation(config: &Value) -> Result<Generation<'_>, ApiError> {
    const P: &str = "generationConfig";
    let Some(config) = config.as_object() else {
        return Err(invalid_type(P, P, "an object", config));
    };
    let mut g = Generation::default();
    let mut mime: Option<&str> = None;
    let mut schema: Option<Value> = None;
    for (name, value) in fields(config) {
        match name.as_ref() {
            "temperature" => {
                g.temperature = Some(number(P, "generationConfig.temperature", value)?)
            }
            "topP" => g.top_p = Some(number(P, "generationConfig.topP", value)?),
            "presencePenalty" => {
                g.presence_penalty = Some(number(P, "generationConfig.presencePenalty", value)?)
            }
            "frequencyPenalty" => {
                g.frequency_penalty = Some(number(P, "generationConfig.frequencyPenalty", value)?)
            }
            "seed" => {
                if value.as_i64().is_none() {
                    return Err(invalid_type(
                        P,
                        "generationConfig.seed",
                        "an integer",
                        value,
                    ));
                }
                g.seed = Some(value);
            }
            "maxOutputTokens" => {
                g.max_tokens = Some(positive(P, "generationConfig.maxOutputTokens", value)?)
            }
            "candidateCount" => g.n = Some(positive(P, "generationConfig.candidateCount", value)?),
            "stopSequences" => {
                let want = "an array of strings";
                let Value::Array(items) = value else {
                    return Err(invalid_type(
                        P,
                        "generationConfig.stopSequences",
                        want,
                        value,
                    ));
                };
                for item in items {
                    let s = item.as_str().ok_or_else(|| {
                        invalid_type(P, "generationConfig.stopSequences", want, item)
                    })?;
                    g.stop.push(s);
                }
            }
            "responseMimeType" => {
                mime = Some(value.as_str().ok_or_else(|| {
                    invalid_type(P, "generationConfig.responseMimeType", "a string", value)
                })?)
            }
            "responseSchema" | "responseJsonSchema" => {
                if schema.is_some() {
                    return Err(invalid_value(
                        P,
                        "Set only one of generationConfig.responseSchema and \
                         generationConfig.responseJsonSchema."
                            .into(),
                    ));
                }
                schema = Some(if name == "responseSchema" {
                    gemini_schema(value)
                } else {
                    value.clone()
                });
            }
            "thinkingConfig" => g.reasoning_effort = thinking_effort(value)?,
            "responseModalities" => {
                let text_only = value.as_array().is_some_and(|m| {
                    m.iter()
                        .all(|m| m.as_str().is_some_and(|m| m.eq_ignore_ascii_case("TEXT")))
                });
                if !text_only {
                    return Err(unsupported(
                        P,
                        "generationConfig.responseModalities: only TEXT output is supported by \
                         this provider through this gateway."
                            .into(),
                    ));
                }
            }
            "responseLogprobs" if value.as_bool() == Some(false) => {}
            // Tuning hints with no OpenAI counterpart; the provider's defaults apply.
            "mediaResolution" | "enableEnhancedCivicAnswers" => {}
            other => {
                return Err(unsupported(
                    P,
                    format!(
                        "generationConfig.{other} is not supported by this provider through \
                         this gateway."
                    ),
                ))
            }
        }
    }
    g.response_format = match mime.map(str::to_ascii_lowercase).as_deref() {
        None | Some("text/plain") => {
            if schema.is_some() {
                return Err(invalid_value(
                    P,
                    "generationConfig.responseSchema and responseJsonSchema need \
                     responseMimeType 'application/json'."
                        .into(),
                ));
            }
            None
        }
        Some("application/json") => Some(match schema {
            Some(schema) => json!({
                "type": "json_schema",
                "json_schema": {"name": "response", "schema": schema}
            }),
            None => json!({"type": "json_object"}),
        }),
        Some(other) => {
            return Err(unsupported(
                P,
                format!(
                    "generationConfig.responseMimeType '{other}' is not supported by this \
                     provider through this gateway; use 'text/plain' or 'application/json'."
                ),
            ))
        }
    };
    Ok(g)
}

#[derive(Serialize)]
struct ChatRequest<'a> {
    model: &'a str,
    messages: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    stop: Vec<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    n: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    presence_penalty: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    frequency_penalty: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_effort: Option<&'static str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<Value>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<Value>,
}

/// Gemini GenerateContentRequest body -> OpenAI chat completions request
/// body with `model` = `upstream_model`; when `stream`, sets `stream: true`
/// and `stream_options.include_usage: true`.
pub fn gemini_request_to_chat(
    body: &[u8],
    upstream_model: &str,
    stream: bool,
) -> Result<Vec<u8>, ApiError> {
    let req = crate::translate::request_object(body)?;

    let mut conv = Conversation::default();
    let mut contents: Option<&Value> = None;
    let mut tools: Vec<Value> = Vec::new();
    let mut tool_config: Option<&Value> = None;
    let mut generation = Generation::default();
    for (name, value) in fields(&req) {
        match name.as_ref() {
            "contents" => contents = Some(value),
            "systemInstruction" => {
                let text = system_text(value)?;
                if !text.is_empty() {
                    conv.messages
                        .push(json!({"role": "system", "content": text}));
                }
            }
            "tools" => tools = convert_tools(value)?,
            "toolConfig" => tool_config = Some(value),
            "generationConfig" => generation = convert_generation(value)?,
            // Safety settings only restrict what Gemini may answer; the
            // provider applies its own policies.
            "safetySettings" => {
                if !value.is_array() {
                    return Err(invalid_type(
                        "safetySettings",
                        "safetySettings",
                        "an array",
                        value,
                    ));
                }
            }
            // The model comes from the URL; labels are billing metadata.
            "model" | "labels" => {}
            "cachedContent" => {
                return Err(unsupported(
                    "cachedContent",
                    "cachedContent: Gemini context caches are not supported by this provider \
                     through this gateway; send the full contents."
                        .into(),
                ))
            }
            other => {
                return Err(ApiError::invalid_request(
                    Some("unsupported_parameter"),
                    format!(
                        "The request field '{other}' is not supported by this provider through \
                         this gateway."
                    ),
                ))
            }
        }
    }
    match contents {
        Some(Value::Array(c)) if !c.is_empty() => convert_contents(c, &mut conv)?,
        Some(Value::Array(_)) | None => {
            return Err(ApiError::invalid_request(
                Some("missing_required_parameter"),
                "'contents' must contain at least one Content.".into(),
            )
            .with_param("contents"))
        }
        Some(other) => return Err(invalid_type("contents", "contents", "an array", other)),
    }
    let tool_choice = match tool_config {
        Some(config) => convert_tool_config(config, &mut tools)?,
        None => None,
    };

    let out = ChatRequest {
        model: upstream_model,
        messages: conv.messages,
        temperature: generation.temperature,
        top_p: generation.top_p,
        max_tokens: generation.max_tokens,
        stop: generation.stop,
        n: generation.n,
        seed: generation.seed,
        presence_penalty: generation.presence_penalty,
        frequency_penalty: generation.frequency_penalty,
        response_format: generation.response_format,
        reasoning_effort: generation.reasoning_effort,
        tools,
        tool_choice,
        stream,
        stream_options: stream.then(|| json!({"include_usage": true})),
    };
    serde_json::to_vec(&out).map_err(|e| {
        ApiError::new(
            500,
            "server_error",
            Some("gateway_error"),
            format!("Gateway error: could not serialize the chat completions request: {e}."),
        )
    })
}

// ---------------------------------------------------------------------------
// Responses: OpenAI -> Gemini
// ---------------------------------------------------------------------------

/// One part of a candidate, before serialization.
enum Piece<'a> {
    Text(Cow<'a, str>),
    Thought(Cow<'a, str>),
    Call(FunctionCallOut),
}

/// One candidate, before serialization.
struct Cand<'a> {
    index: u64,
    pieces: Vec<Piece<'a>>,
    finish: Option<&'static str>,
}

impl Cand<'_> {
    /// The serializable view; `pad` gives a candidate without parts an
    /// empty text part (see the module documentation on streaming).
    fn view(&self, pad: bool) -> Candidate<'_> {
        let mut parts: Vec<Part<'_>> = self
            .pieces
            .iter()
            .map(|p| match p {
                Piece::Text(t) => Part {
                    text: Some(t),
                    ..Part::default()
                },
                Piece::Thought(t) => Part {
                    text: Some(t),
                    thought: Some(true),
                    ..Part::default()
                },
                Piece::Call(c) => Part {
                    function_call: Some(c),
                    ..Part::default()
                },
            })
            .collect();
        if pad && parts.is_empty() {
            parts.push(Part {
                text: Some(""),
                ..Part::default()
            });
        }
        Candidate {
            content: CandidateContent {
                parts,
                role: "model",
            },
            finish_reason: self.finish,
            index: self.index,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct GenerateContentResponse<'a> {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    candidates: Vec<Candidate<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage_metadata: Option<UsageMetadata>,
    #[serde(skip_serializing_if = "str::is_empty")]
    model_version: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    response_id: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Candidate<'a> {
    content: CandidateContent<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    finish_reason: Option<&'static str>,
    index: u64,
}

#[derive(Serialize)]
struct CandidateContent<'a> {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    parts: Vec<Part<'a>>,
    role: &'static str,
}

#[derive(Serialize, Default)]
#[serde(rename_all = "camelCase")]
struct Part<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    thought: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    function_call: Option<&'a FunctionCallOut>,
}

#[derive(Serialize, Debug)]
struct FunctionCallOut {
    #[serde(skip_serializing_if = "String::is_empty")]
    id: String,
    name: String,
    args: Value,
}

impl FunctionCallOut {
    /// Gemini wants the arguments as an object. Empty arguments are `{}`;
    /// arguments that are not a JSON object (a model's mistake) are passed
    /// as `{"arguments": <the raw text>}` rather than lost.
    fn new(id: String, name: String, arguments: &str) -> Self {
        let args = if arguments.trim().is_empty() {
            Value::Object(Map::new())
        } else {
            match from_str_lossy::<Value>(arguments) {
                Ok(v @ Value::Object(_)) => v,
                _ => {
                    log::warn!("a tool call's arguments are not a JSON object; passing them raw");
                    json!({"arguments": arguments})
                }
            }
        };
        FunctionCallOut { id, name, args }
    }
}

#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
struct UsageMetadata {
    prompt_token_count: u64,
    candidates_token_count: u64,
    #[serde(skip_serializing_if = "is_zero")]
    cached_content_token_count: u64,
    #[serde(skip_serializing_if = "is_zero")]
    thoughts_token_count: u64,
    total_token_count: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// OpenAI `usage` -> the shared counts.
fn read_usage(usage: &Value) -> Usage {
    let n = |path: &str| usage.pointer(path).and_then(Value::as_u64).unwrap_or(0);
    Usage {
        input_tokens: n("/prompt_tokens"),
        output_tokens: n("/completion_tokens"),
        cached_input_tokens: n("/prompt_tokens_details/cached_tokens"),
        reasoning_tokens: n("/completion_tokens_details/reasoning_tokens"),
    }
}

/// Gemini counts thoughts apart from the answer; the total is the same.
fn usage_metadata(u: &Usage) -> UsageMetadata {
    UsageMetadata {
        prompt_token_count: u.input_tokens,
        candidates_token_count: u.output_tokens.saturating_sub(u.reasoning_tokens),
        cached_content_token_count: u.cached_input_tokens,
        thoughts_token_count: u.reasoning_tokens,
        total_token_count: u.input_tokens.saturating_add(u.output_tokens),
    }
}

/// OpenAI `finish_reason` -> Gemini `finishReason`.
fn finish_reason(reason: &str) -> &'static str {
    match reason {
        "stop" | "tool_calls" | "function_call" => "STOP",
        "length" => "MAX_TOKENS",
        "content_filter" => "SAFETY",
        _ => "OTHER",
    }
}

/// Reasoning text, as providers name it in the pivot.
fn reasoning_of(o: &Value) -> Option<&str> {
    o.get("reasoning_content")
        .or_else(|| o.get("reasoning"))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

/// A message's `content`: a string, or text parts.
fn content_text(content: Option<&Value>) -> Option<Cow<'_, str>> {
    match content? {
        Value::String(s) if !s.is_empty() => Some(Cow::Borrowed(s)),
        Value::Array(parts) => {
            let text: String = parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect();
            (!text.is_empty()).then_some(Cow::Owned(text))
        }
        _ => None,
    }
}

fn call_of(call: &Value) -> FunctionCallOut {
    let text = |path: &str| {
        call.pointer(path)
            .and_then(Value::as_str)
            .unwrap_or_default()
    };
    FunctionCallOut::new(
        text("/id").to_string(),
        text("/function/name").to_string(),
        text("/function/arguments"),
    )
}

/// OpenAI chat.completion -> Gemini GenerateContentResponse (candidates,
/// usageMetadata, modelVersion, responseId).
pub fn chat_response_to_gemini(openai_body: &[u8]) -> Result<Vec<u8>, String> {
    let v: Value = from_slice_lossy(openai_body)
        .map_err(|e| format!("the chat completion is not valid JSON: {e}"))?;
    let choices = v
        .get("choices")
        .and_then(Value::as_array)
        .ok_or("the chat completion has no 'choices' array")?;
    let mut cands = Vec::with_capacity(choices.len());
    for (position, choice) in choices.iter().enumerate() {
        let mut pieces = Vec::new();
        let message = choice.get("message");
        if let Some(r) = message.and_then(reasoning_of) {
            pieces.push(Piece::Thought(Cow::Borrowed(r)));
        }
        let refusal = message
            .and_then(|m| m.get("refusal"))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(Cow::Borrowed);
        if let Some(text) = content_text(message.and_then(|m| m.get("content"))).or(refusal) {
            pieces.push(Piece::Text(text));
        }
        for call in message
            .and_then(|m| m.get("tool_calls"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            pieces.push(Piece::Call(call_of(call)));
        }
        cands.push(Cand {
            index: choice
                .get("index")
                .and_then(Value::as_u64)
                .unwrap_or(position as u64),
            pieces,
            finish: choice
                .get("finish_reason")
                .and_then(Value::as_str)
                .map(finish_reason),
        });
    }
    let text = |name: &str| v.get(name).and_then(Value::as_str).unwrap_or_default();
    let response = GenerateContentResponse {
        candidates: cands.iter().map(|c| c.view(false)).collect(),
        usage_metadata: v
            .get("usage")
            .filter(|u| u.is_object())
            .map(|u| usage_metadata(&read_usage(u))),
        model_version: text("model"),
        response_id: text("id"),
    };
    serde_json::to_vec(&response).map_err(|e| format!("could not serialize the answer: {e}"))
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// Google's canonical status name for an HTTP status.
fn google_status(status: u16) -> &'static str {
    match status {
        400 | 413 | 422 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        409 => "ABORTED",
        412 => "FAILED_PRECONDITION",
        416 => "OUT_OF_RANGE",
        429 => "RESOURCE_EXHAUSTED",
        499 => "CANCELLED",
        501 => "UNIMPLEMENTED",
        502 | 503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        400..=499 => "FAILED_PRECONDITION",
        500..=599 => "INTERNAL",
        _ => "UNKNOWN",
    }
}

#[derive(Serialize)]
struct GoogleErrorEnvelope<'a> {
    error: GoogleError<'a>,
}

#[derive(Serialize)]
struct GoogleError<'a> {
    code: u16,
    message: &'a str,
    status: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    details: Vec<ErrorInfo>,
}

/// A `google.rpc.ErrorInfo` detail carrying the gateway's OpenAI-style code
/// (upper-cased, as Google's reasons are) and the offending parameter.
#[derive(Serialize)]
struct ErrorInfo {
    #[serde(rename = "@type")]
    kind: &'static str,
    reason: String,
    domain: &'static str,
    #[serde(skip_serializing_if = "Map::is_empty")]
    metadata: Map<String, Value>,
}

fn google_error(status: u16, message: &str, reason: Option<&str>, param: Option<&str>) -> Vec<u8> {
    let mut details = Vec::new();
    if let Some(reason) = reason.filter(|r| !r.is_empty()) {
        let mut metadata = Map::new();
        if let Some(param) = param {
            metadata.insert("param".into(), Value::String(param.to_string()));
        }
        details.push(ErrorInfo {
            kind: "type.googleapis.com/google.rpc.ErrorInfo",
            reason: reason.to_ascii_uppercase(),
            domain: "meshllm",
            metadata,
        });
    }
    let envelope = GoogleErrorEnvelope {
        error: GoogleError {
            code: status,
            message,
            status: google_status(status),
            details,
        },
    };
    // Serializing these plain structs cannot fail; fall back to a fixed body anyway.
    serde_json::to_vec(&envelope).unwrap_or_else(|_| {
        br#"{"error":{"code":500,"message":"internal error","status":"INTERNAL"}}"#.to_vec()
    })
}

/// Gemini-shaped error for an error the gateway raises:
/// `{"error":{"code":<status>,"message":..,"status":"INVALID_ARGUMENT"|..,"details":[..]}}`.
/// The OpenAI `code` and `param` travel in a `google.rpc.ErrorInfo` detail
/// (reason `UNSUPPORTED_PARAMETER`, metadata `{"param": ..}`).
pub fn error_body(error: &ApiError) -> Vec<u8> {
    google_error(error.status, &error.message, error.code, error.param)
}

/// The `code` of an OpenAI error object, when it is a string.
fn error_code(error: Option<&Value>) -> Option<&str> {
    error.and_then(|e| e.get("code")).and_then(Value::as_str)
}

/// An OpenAI-shaped error body (what the gateway normalises provider errors
/// to) -> Gemini error body for `status`.
pub fn chat_error_to_gemini(status: u16, openai_error_body: &[u8]) -> Vec<u8> {
    let parsed: Option<Value> = from_slice_lossy(openai_error_body).ok();
    let error = parsed.as_ref().and_then(|v| v.get("error"));
    let message = error
        .and_then(|e| e.get("message"))
        .or_else(|| parsed.as_ref().and_then(|v| v.get("message")))
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| {
            let text = quoted(openai_error_body);
            if text.is_empty() {
                format!("The provider returned HTTP {status} with no details.")
            } else {
                format!("The provider returned HTTP {status}: {text}")
            }
        });
    let param = error.and_then(|e| e.get("param")).and_then(Value::as_str);
    google_error(status, &message, error_code(error), param)
}

/// The HTTP status an OpenAI error event stands for (an error event in a
/// stream has none of its own).
fn status_of_error_event(error: &Value) -> u16 {
    if let Some(n) = error
        .get("code")
        .or_else(|| error.get("status"))
        .and_then(Value::as_u64)
        .filter(|n| (400..=599).contains(n))
    {
        return u16::try_from(n).unwrap_or(500);
    }
    match error_code(Some(error)) {
        Some(
            "stream_interrupted"
            | "provider_unavailable"
            | "invalid_provider_response"
            | "provider_event_too_large",
        ) => return 502,
        Some("provider_timeout") => return 504,
        Some("overloaded") => return 503,
        Some("rate_limit_exceeded") => return 429,
        Some("request_too_large") => return 413,
        _ => {}
    }
    match error.get("type").and_then(Value::as_str) {
        Some("invalid_request_error") => 400,
        Some("authentication_error") => 401,
        Some("permission_error") => 403,
        Some("not_found_error") => 404,
        Some("conflict_error") => 409,
        Some("rate_limit_error") => 429,
        _ => 500,
    }
}

// ---------------------------------------------------------------------------
// Streaming: OpenAI chat.completion.chunk SSE -> Gemini SSE
// ---------------------------------------------------------------------------

/// A tool call whose arguments are still arriving.
struct PendingCall {
    choice: u64,
    index: u64,
    id: String,
    name: String,
    arguments: String,
}

/// OpenAI chunk SSE -> Gemini SSE (`data: {GenerateContentResponse}\r\n\r\n`
/// per event, as Google sends).
pub type ChatStreamToGemini = EventStream<SseParser, ChunksToGemini>;

impl ChatStreamToGemini {
    pub fn new() -> Self {
        Self::default()
    }
}

/// The per-event mapping of [`ChatStreamToGemini`].
#[derive(Default)]
pub struct ChunksToGemini {
    id: String,
    model: String,
    /// Tool calls whose arguments are still arriving, in order.
    pending: Vec<PendingCall>,
    /// Candidates that finished, waiting to be sent with the usage.
    held: Vec<Cand<'static>>,
    usage: Option<Usage>,
}

fn write_event(out: &mut Vec<u8>, json: &[u8]) {
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(json);
    out.extend_from_slice(b"\r\n\r\n");
}

impl EventMapping for ChunksToGemini {
    type Event = SseEvent;
    const UPSTREAM: &'static str = "provider's";

    fn on_event(&mut self, event: SseEvent, out: &mut Vec<u8>) -> Result<Flow, StreamFault> {
        if event.data.trim() == "[DONE]" {
            self.done(out);
            return Ok(Flow::Ended);
        }
        let Ok(v) = from_str_lossy::<Value>(&event.data) else {
            return Err(StreamFault::Corrupt);
        };
        if let Some(error) = v.get("error").filter(|e| e.is_object()) {
            self.fail(error, out);
            return Ok(Flow::Ended);
        }
        self.handle(&v, out);
        Ok(Flow::Open)
    }

    /// What was held goes out without its finish reason, then the error:
    /// a broken stream must never look complete.
    fn write_error(&mut self, error: &ApiError, out: &mut Vec<u8>) {
        self.flush_held_unfinished(out);
        let body = google_error(error.status, &error.message, error.code, None);
        write_event(out, &body);
    }

    fn usage(&self) -> Option<Usage> {
        self.usage
    }
}

impl ChunksToGemini {
    /// A stream that broke: what finished candidates held goes out without
    /// the finish reason, which would mark the answer complete.
    fn flush_held_unfinished(&mut self, out: &mut Vec<u8>) {
        let mut held = std::mem::take(&mut self.held);
        held.retain(|c| !c.pieces.is_empty());
        if held.is_empty() {
            return;
        }
        for c in &mut held {
            c.finish = None;
        }
        self.write(out, &held, None);
    }

    fn write(&self, out: &mut Vec<u8>, cands: &[Cand<'_>], usage: Option<UsageMetadata>) {
        let response = GenerateContentResponse {
            candidates: cands.iter().map(|c| c.view(true)).collect(),
            usage_metadata: usage,
            model_version: &self.model,
            response_id: &self.id,
        };
        match serde_json::to_vec(&response) {
            Ok(json) => write_event(out, &json),
            Err(e) => log::error!("could not serialize a Gemini stream event: {e}"),
        }
    }

    /// Writes the held finishing candidates, with `usage` if given.
    fn flush_held(&mut self, out: &mut Vec<u8>, usage: Option<UsageMetadata>) {
        if self.held.is_empty() {
            return;
        }
        let held = std::mem::take(&mut self.held);
        self.write(out, &held, usage);
    }

    /// Removes the pending calls of `choice` (of every choice with `None`)
    /// and returns them whole, in order.
    fn take_calls(&mut self, choice: Option<u64>) -> Vec<(u64, FunctionCallOut)> {
        let (done, open): (Vec<PendingCall>, Vec<PendingCall>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|c| choice.is_none_or(|n| c.choice == n));
        self.pending = open;
        done.into_iter()
            .map(|c| (c.choice, FunctionCallOut::new(c.id, c.name, &c.arguments)))
            .collect()
    }

    fn fail(&mut self, error: &Value, out: &mut Vec<u8>) {
        self.flush_held_unfinished(out);
        let status = status_of_error_event(error);
        let message = error
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("The provider reported an error in the stream.");
        let param = error.get("param").and_then(Value::as_str);
        write_event(
            out,
            &google_error(status, message, error_code(Some(error)), param),
        );
    }

    /// `[DONE]`: calls left open by a stream without `finish_reason` are
    /// complete now; what was held goes out.
    fn done(&mut self, out: &mut Vec<u8>) {
        self.flush_held(out, None);
        let mut cands: Vec<Cand<'static>> = Vec::new();
        for (choice, call) in self.take_calls(None) {
            match cands.iter_mut().find(|c| c.index == choice) {
                Some(c) => c.pieces.push(Piece::Call(call)),
                None => cands.push(Cand {
                    index: choice,
                    pieces: vec![Piece::Call(call)],
                    finish: None,
                }),
            }
        }
        if !cands.is_empty() {
            self.write(out, &cands, None);
        }
    }

    fn handle(&mut self, v: &Value, out: &mut Vec<u8>) {
        for (field, name) in [(&mut self.id, "id"), (&mut self.model, "model")] {
            if field.is_empty() {
                if let Some(s) = v.get(name).and_then(Value::as_str) {
                    *field = s.to_string();
                }
            }
        }
        let usage = v.get("usage").filter(|u| u.is_object()).map(read_usage);
        if usage.is_some() {
            self.usage = usage;
        }
        let usage = usage.as_ref().map(usage_metadata);

        let mut live: Vec<Cand<'static>> = Vec::new();
        let mut finished: Vec<Cand<'static>> = Vec::new();
        let choices = v.get("choices").and_then(Value::as_array);
        for (position, choice) in choices.into_iter().flatten().enumerate() {
            let index = choice
                .get("index")
                .and_then(Value::as_u64)
                .unwrap_or(position as u64);
            let mut pieces: Vec<Piece<'static>> = Vec::new();
            let delta = choice.get("delta");
            if let Some(r) = delta.and_then(reasoning_of) {
                pieces.push(Piece::Thought(Cow::Owned(r.to_string())));
            }
            if let Some(t) = content_text(delta.and_then(|d| d.get("content"))) {
                pieces.push(Piece::Text(Cow::Owned(t.into_owned())));
            }
            for call in delta
                .and_then(|d| d.get("tool_calls"))
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                pieces.extend(self.tool_call_delta(index, call).map(Piece::Call));
            }
            match choice.get("finish_reason").and_then(Value::as_str) {
                Some(reason) => {
                    let calls = self.take_calls(Some(index));
                    pieces.extend(calls.into_iter().map(|(_, c)| Piece::Call(c)));
                    finished.push(Cand {
                        index,
                        pieces,
                        finish: Some(finish_reason(reason)),
                    });
                }
                None if !pieces.is_empty() => live.push(Cand {
                    index,
                    pieces,
                    finish: None,
                }),
                None => {}
            }
        }

        if live.is_empty() && finished.is_empty() {
            // A usage chunk: it goes with the finishing event, as Google
            // sends it, or alone when nothing waits.
            if let Some(usage) = usage {
                if self.held.is_empty() {
                    let empty = Cand {
                        index: 0,
                        pieces: Vec::new(),
                        finish: None,
                    };
                    self.write(out, &[empty], Some(usage));
                } else {
                    self.flush_held(out, Some(usage));
                }
            }
            return;
        }
        self.flush_held(out, None);
        if !live.is_empty() {
            let live_usage = if finished.is_empty() { usage } else { None };
            self.write(out, &live, live_usage);
        }
        if !finished.is_empty() {
            if usage.is_some() {
                self.write(out, &finished, usage);
            } else {
                self.held = finished;
            }
        }
    }

    /// Takes in one tool-call delta of `choice`; returns the calls it
    /// completes (those of the choice before it, when it starts a new one).
    fn tool_call_delta(&mut self, choice: u64, call: &Value) -> Option<FunctionCallOut> {
        let text = |path: &str| call.pointer(path).and_then(Value::as_str);
        let index = call
            .get("index")
            .and_then(Value::as_u64)
            .unwrap_or_else(|| {
                // No index: a new call when it brings an id, else the last one.
                let last = self
                    .pending
                    .iter()
                    .filter(|c| c.choice == choice)
                    .map(|c| c.index)
                    .max();
                match (text("/id"), last) {
                    (None, Some(last)) => last,
                    (Some(_), Some(last)) => last.saturating_add(1),
                    (_, None) => 0,
                }
            });
        if let Some(pending) = self
            .pending
            .iter_mut()
            .find(|c| c.choice == choice && c.index == index)
        {
            if let Some(id) = text("/id").filter(|_| pending.id.is_empty()) {
                pending.id = id.to_string();
            }
            if let Some(name) = text("/function/name") {
                pending.name.push_str(name);
            }
            if let Some(args) = text("/function/arguments") {
                pending.arguments.push_str(args);
            }
            return None;
        }
        // A new call starts: the one before it in this choice is complete.
        let done = self.take_calls(Some(choice)).pop().map(|(_, c)| c);
        self.pending.push(PendingCall {
            choice,
            index,
            id: text("/id").unwrap_or_default().to_string(),
            name: text("/function/name").unwrap_or_default().to_string(),
            arguments: text("/function/arguments").unwrap_or_default().to_string(),
        });
        done
    }
}

// ---------------------------------------------------------------------------

/// Gemini `generateContent` callers.
pub struct Gemini;
impl CallerTranslator for Gemini {
    fn request_to_pivot(
        &self,
        body: &[u8],
        upstream_model: &str,
        stream: bool,
    ) -> Result<Vec<u8>, ApiError> {
        gemini_request_to_chat(body, upstream_model, stream)
    }
    fn answer_from_pivot(&self, pivot: &[u8]) -> Result<Vec<u8>, String> {
        chat_response_to_gemini(pivot)
    }
    fn error_body(&self, error: &ApiError) -> Vec<u8> {
        error_body(error)
    }
    fn error_from_pivot(&self, status: u16, pivot: &[u8]) -> Vec<u8> {
        chat_error_to_gemini(status, pivot)
    }
    fn stream_from_pivot(&self, reads_pivot: bool) -> Box<dyn StreamTranslator> {
        let t = ChatStreamToGemini::new();
        Box::new(if reads_pivot { t.reading_pivot() } else { t })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::outbound::anthropic::MessagesStreamToChat;
    use crate::translate::Chain;
    use crate::translate::StreamTranslator;

    const TOOLS_REQUEST: &str =
        include_str!("../../../tests/fixtures/gemini/caller_request_tools.json");
    const IMAGES_REQUEST: &str =
        include_str!("../../../tests/fixtures/gemini/caller_request_images.json");
    const CHAT_HISTORY_REQUEST: &str =
        include_str!("../../../tests/fixtures/gemini/caller_request_chat_history.json");
    const TEXT_STREAM: &str =
        include_str!("../../../tests/fixtures/openai/gemini_caller_text_stream.sse");
    const TOOL_STREAM: &str =
        include_str!("../../../tests/fixtures/openai/gemini_caller_tool_stream.sse");
    const TOOL_RESPONSE: &str =
        include_str!("../../../tests/fixtures/openai/gemini_caller_response_tool.json");
    const MODEL: &str = "gpt-4.1";

    // ----- requests --------------------------------------------------------

    fn translate_bytes(body: &[u8], stream: bool) -> Value {
        let out = gemini_request_to_chat(body, MODEL, stream).unwrap();
        serde_json::from_slice(&out).unwrap()
    }

    fn translate(req: &Value) -> Value {
        translate_bytes(&serde_json::to_vec(req).unwrap(), false)
    }

    fn user(text: &str) -> Value {
        json!({"role": "user", "parts": [{"text": text}]})
    }

    /// A request with one user turn and `extra` fields.
    fn with(extra: Value) -> Value {
        let mut req = json!({"contents": [user("x")]});
        req.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        req
    }

    /// `tool` messages carry JSON text: compare it parsed.
    fn parsed_tool_contents(out: &mut Value) {
        for m in out["messages"].as_array_mut().unwrap() {
            if m["role"] == "tool" {
                let text = m["content"].as_str().unwrap().to_string();
                m["content"] = serde_json::from_str(&text).unwrap();
            }
        }
    }

    #[test]
    fn google_genai_tool_conversation() {
        // Captured from google-genai 3.4.0: camelCase fields, snake_case inside
        // pass-through values, thought parts with signatures, calls with and
        // without ids, responses matched by name.
        let mut out = translate_bytes(TOOLS_REQUEST.as_bytes(), false);
        parsed_tool_contents(&mut out);
        let weather_schema = json!({
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "City and country"},
                "unit": {"type": ["string", "null"], "enum": ["celsius", "fahrenheit", null]},
                "days": {"type": "array", "items": {"type": "integer"}, "maxItems": 3}
            },
            "required": ["location"]
        });
        assert_eq!(
            out,
            json!({
                "model": MODEL,
                "messages": [
                    {"role": "system", "content": "You are a concise travel assistant."},
                    {"role": "user", "content": "Weather in Paris and Tokyo, and the time in Paris?"},
                    {"role": "assistant", "content": "Checking.", "tool_calls": [
                        {"id": "call_abc", "type": "function", "function":
                            {"name": "get_weather", "arguments": "{\"location\":\"Paris, France\"}"}},
                        {"id": "call_1_1", "type": "function", "function":
                            {"name": "get_weather", "arguments": "{\"location\":\"Tokyo, Japan\"}"}},
                        {"id": "call_1_2", "type": "function", "function":
                            {"name": "get_time", "arguments": "{\"timezone\":\"Europe/Paris\"}"}}]},
                    {"role": "tool", "tool_call_id": "call_abc",
                     "content": {"output": {"temp_c": 18, "sky": "cloudy"}}},
                    {"role": "tool", "tool_call_id": "call_1_2", "content": {"result": "14:05"}},
                    {"role": "tool", "tool_call_id": "call_1_1", "content": {"output": {"temp_c": 24}}}
                ],
                "temperature": 0.4, "top_p": 0.9, "max_tokens": 1024, "stop": ["END"], "n": 1,
                "seed": 42, "presence_penalty": 0.1, "frequency_penalty": 0.2,
                "reasoning_effort": "medium",
                "tools": [
                    {"type": "function", "function": {"name": "get_weather",
                        "description": "Current weather in a city", "parameters": weather_schema}},
                    {"type": "function", "function": {"name": "get_time", "description": "Local time",
                        "parameters": {"type": "object",
                                       "properties": {"timezone": {"type": "string"}},
                                       "required": ["timezone"]}}}
                ],
                "tool_choice": {"type": "function", "function": {"name": "get_weather"}}
            })
        );
    }

    #[test]
    fn google_genai_streamed_chat_history() {
        // The third request of a google-genai chat whose first two answers
        // were streamed (this module's own output for the two stream
        // fixtures): one model content per chunk, merged back into one
        // assistant message per turn.
        let mut out = translate_bytes(CHAT_HISTORY_REQUEST.as_bytes(), true);
        parsed_tool_contents(&mut out);
        assert_eq!(
            out["messages"],
            json!([
                {"role": "user", "content": "Hello!"},
                {"role": "assistant",
                 "content": "Bonjour, café ☕ — ça va? 👋\nSecond line with \"quotes\"."},
                {"role": "user", "content": "Weather and time in Paris?"},
                {"role": "assistant", "content": "Checking both.", "tool_calls": [
                    {"id": "call_kIYtFDwOJSbsu6cyZ3uGnFsT", "type": "function", "function":
                        {"name": "get_weather",
                         "arguments": "{\"location\":\"Paris, France\",\"unit\":\"celsius\"}"}},
                    {"id": "call_Xu2Aa2Lp5WbFm6gq0S3T8Mt1", "type": "function", "function":
                        {"name": "get_time", "arguments": "{\"timezone\":\"Europe/Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "call_kIYtFDwOJSbsu6cyZ3uGnFsT",
                 "content": {"output": {"temp_c": 18}}},
                {"role": "tool", "tool_call_id": "call_Xu2Aa2Lp5WbFm6gq0S3T8Mt1",
                 "content": {"output": "14:05"}}
            ])
        );
        // Tools from Python functions: JSON schemas, output schemas dropped.
        assert_eq!(
            out["tools"][1],
            json!({"type": "function", "function": {"name": "get_time",
                "description": "Local time.",
                "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}},
                               "required": ["timezone"]}}})
        );
        assert!(out.get("reasoning_effort").is_none());
        assert_eq!(out["stream_options"], json!({"include_usage": true}));
    }

    #[test]
    fn google_genai_images_and_response_schema() {
        let out = translate_bytes(IMAGES_REQUEST.as_bytes(), false);
        assert_eq!(
            out,
            json!({
                "model": MODEL,
                "messages": [{"role": "user", "content": [
                    {"type": "text", "text": "Compare these images."},
                    // google-genai's URL-safe base64, in the standard alphabet.
                    {"type": "image_url", "image_url":
                        {"url": "data:image/png;base64,+vv8/f7/iVBORw0KGgr//g=="}},
                    {"type": "image_url", "image_url": {"url":
                        "https://upload.wikimedia.org/wikipedia/commons/a/a7/Camponotus_flavomarginatus_ant.jpg"}}
                ]}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "response",
                    "schema": {"type": "object",
                               "properties": {"same": {"type": "boolean"},
                                              "reasons": {"type": "array", "items": {"type": "string"}}},
                               "required": ["same"]}}}
            })
        );
    }

    #[test]
    fn stream_flag_comes_from_the_caller() {
        let body = br#"{"contents":[{"role":"user","parts":[{"text":"Hi"}]}]}"#;
        assert_eq!(
            translate_bytes(body, true),
            json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                   "stream": true, "stream_options": {"include_usage": true}})
        );
        assert_eq!(
            translate_bytes(body, false),
            json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]})
        );
    }

    #[test]
    fn request_table() {
        let table: Vec<(&str, Value, Value)> = vec![
            (
                "no role means user; several text parts stay parts",
                json!({"contents": [{"parts": [{"text": "a"}, {"text": "b"}]}]}),
                json!({"model": MODEL, "messages": [{"role": "user", "content": [
                    {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}),
            ),
            (
                "snake_case everywhere; system instruction as a string; parts joined",
                json!({"system_instruction": {"parts": [{"text": "One."}, {"text": "Two."}]},
                       "contents": [user("x")],
                       "generation_config": {"max_output_tokens": "77", "stop_sequences": [],
                                             "top_p": 1},
                       "safety_settings": [{"category": "HARM_CATEGORY_HARASSMENT",
                                            "threshold": "BLOCK_NONE"}]}),
                json!({"model": MODEL, "messages": [
                    {"role": "system", "content": "One.\nTwo."},
                    {"role": "user", "content": "x"}], "max_tokens": 77, "top_p": 1}),
            ),
            (
                "system instruction given as a plain string; nulls are absent",
                json!({"systemInstruction": "Be brief.", "contents": [user("x")],
                       "tools": null, "generationConfig": {"temperature": null}}),
                json!({"model": MODEL, "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "x"}]}),
            ),
            (
                "model turn of thoughts only is skipped; function role; ids matched first",
                json!({"contents": [
                    user("go"),
                    {"role": "model", "parts": [{"text": "hmm", "thought": true,
                                                 "thoughtSignature": "c2ln"}]},
                    {"role": "model", "parts": [
                        {"functionCall": {"name": "f", "args": {}, "id": "a"}},
                        {"functionCall": {"name": "f"}, "thoughtSignature": "c2ln"}]},
                    {"role": "function", "parts": [
                        {"functionResponse": {"name": "f", "id": "call_2_1", "response": {"n": 2}}},
                        {"functionResponse": {"name": "f", "response": {"n": 1}}},
                        {"text": "and now?"}]}
                ]}),
                json!({"model": MODEL, "messages": [
                    {"role": "user", "content": "go"},
                    {"role": "assistant", "content": null, "tool_calls": [
                        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                        {"id": "call_2_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                    {"role": "tool", "tool_call_id": "call_2_1", "content": "{\"n\":2}"},
                    {"role": "tool", "tool_call_id": "a", "content": "{\"n\":1}"},
                    {"role": "user", "content": "and now?"}]}),
            ),
            (
                "tool results come before the turn's text, whatever the part order",
                json!({"contents": [
                    user("go"),
                    {"role": "model", "parts": [{"text": "ok "}, {"text": "calling"},
                                                {"functionCall": {"name": "g", "args": {"q": [1, null]}}}]},
                    {"role": "user", "parts": [{"text": "here:"},
                                               {"functionResponse": {"name": "g", "response": {}}}]}
                ]}),
                json!({"model": MODEL, "messages": [
                    {"role": "user", "content": "go"},
                    {"role": "assistant", "content": "ok calling", "tool_calls": [
                        {"id": "call_1_0", "type": "function",
                         "function": {"name": "g", "arguments": "{\"q\":[1,null]}"}}]},
                    {"role": "tool", "tool_call_id": "call_1_0", "content": "{}"},
                    {"role": "user", "content": "here:"}]}),
            ),
            (
                "consecutive model contents merge, thought-only ones in between too",
                json!({"contents": [
                    user("go"),
                    {"role": "model", "parts": [{"functionCall": {"name": "f", "id": "a"}}]},
                    {"role": "model", "parts": [{"text": "t", "thought": true}]},
                    {"role": "model", "parts": [{"text": "after"}, {"functionCall": {"name": "f"}}]},
                    {"role": "user", "parts": [{"functionResponse": {"name": "f", "response": {"r": 1}}},
                                               {"functionResponse": {"name": "f", "response": {"r": 2}}}]}
                ]}),
                json!({"model": MODEL, "messages": [
                    {"role": "user", "content": "go"},
                    {"role": "assistant", "content": "after", "tool_calls": [
                        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                        {"id": "call_3_0", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                    {"role": "tool", "tool_call_id": "a", "content": "{\"r\":1}"},
                    {"role": "tool", "tool_call_id": "call_3_0", "content": "{\"r\":2}"}]}),
            ),
            (
                "image URL without mime type, by extension; media resolution dropped",
                json!({"contents": [{"role": "user", "parts": [
                    {"fileData": {"fileUri": "https://example.com/cat.PNG?size=2"}}]}],
                       "generationConfig": {"mediaResolution": "MEDIA_RESOLUTION_HIGH"}}),
                json!({"model": MODEL, "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.PNG?size=2"}}]}]}),
            ),
            (
                "plain JSON output; candidates and text modality",
                with(
                    json!({"generationConfig": {"responseMimeType": "application/json",
                                                 "candidateCount": 2,
                                                 "responseModalities": ["TEXT"]}}),
                ),
                json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 2,
                       "response_format": {"type": "json_object"}}),
            ),
            (
                "responseJsonSchema is passed as it is",
                with(
                    json!({"generationConfig": {"responseMimeType": "application/json",
                    "responseJsonSchema": {"type": "object", "properties": {"a_b": {"type": "string"}},
                                           "additionalProperties": false}}}),
                ),
                json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                       "response_format": {"type": "json_schema", "json_schema": {"name": "response",
                           "schema": {"type": "object", "properties": {"a_b": {"type": "string"}},
                                      "additionalProperties": false}}}}),
            ),
            (
                "text/plain output is the default",
                with(
                    json!({"generationConfig": {"responseMimeType": "text/plain",
                                                 "responseLogprobs": false}}),
                ),
                json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}]}),
            ),
        ];
        for (name, input, expected) in table {
            assert_eq!(translate(&input), expected, "{name}");
        }
    }

    #[test]
    fn gemini_schemas_become_json_schemas() {
        let schema = json!({
            "type": "OBJECT",
            "title": "Order",
            "properties": {
                "max_items": {"type": "INTEGER", "minimum": 1, "format": "int32"},
                "item_ids": {"type": "ARRAY", "items": {"type": "STRING"},
                             "minItems": "1", "max_items": "5"},
                "note": {"any_of": [{"type": "STRING"}, {"type": "NUMBER"}], "nullable": true},
                "kind": {"type": "STRING", "enum": ["a", "b"], "nullable": false},
                "meta": {"type": "OBJECT", "additional_properties": {"type": "BOOLEAN"},
                         "property_ordering": []},
                "anything": {"type": "TYPE_UNSPECIFIED", "description": "free"}
            },
            "required": ["max_items"],
            "propertyOrdering": ["max_items", "item_ids"]
        });
        let req = with(json!({"tools": [{"function_declarations": [
            {"name": "order", "parameters": schema}]}]}));
        assert_eq!(
            translate(&req)["tools"][0]["function"]["parameters"],
            json!({
                "type": "object",
                "title": "Order",
                "properties": {
                    // Property names are data: never re-cased.
                    "max_items": {"type": "integer", "minimum": 1, "format": "int32"},
                    "item_ids": {"type": "array", "items": {"type": "string"},
                                 "minItems": 1, "maxItems": 5},
                    "note": {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "null"}]},
                    "kind": {"type": "string", "enum": ["a", "b"]},
                    "meta": {"type": "object", "additionalProperties": {"type": "boolean"}},
                    "anything": {"description": "free"}
                },
                "required": ["max_items"]
            })
        );
    }

    #[test]
    fn tool_config_table() {
        let tools = json!([{"functionDeclarations": [
            {"name": "a"}, {"name": "b"}, {"name": "c"}]}]);
        let named = |n: &str| json!({"type": "function", "function": {"name": n}});
        // (case, functionCallingConfig, tool_choice, tools left)
        let table: Vec<(&str, Value, Value, Vec<&str>)> = vec![
            ("absent", json!({}), Value::Null, vec!["a", "b", "c"]),
            (
                "unspecified",
                json!({"mode": "MODE_UNSPECIFIED"}),
                Value::Null,
                vec!["a", "b", "c"],
            ),
            (
                "auto",
                json!({"mode": "AUTO"}),
                json!("auto"),
                vec!["a", "b", "c"],
            ),
            (
                "lower-case mode",
                json!({"mode": "auto"}),
                json!("auto"),
                vec!["a", "b", "c"],
            ),
            (
                "none",
                json!({"mode": "NONE"}),
                json!("none"),
                vec!["a", "b", "c"],
            ),
            (
                "any",
                json!({"mode": "ANY"}),
                json!("required"),
                vec!["a", "b", "c"],
            ),
            (
                "validated",
                json!({"mode": "VALIDATED"}),
                json!("auto"),
                vec!["a", "b", "c"],
            ),
            (
                "any, one allowed: named choice",
                json!({"mode": "ANY", "allowedFunctionNames": ["b"]}),
                named("b"),
                vec!["a", "b", "c"],
            ),
            (
                "any, several allowed: tools narrowed, required",
                json!({"mode": "ANY", "allowed_function_names": ["c", "a"]}),
                json!("required"),
                vec!["a", "c"],
            ),
            (
                "validated, one allowed: narrowed, auto",
                json!({"mode": "VALIDATED", "allowedFunctionNames": ["b"]}),
                json!("auto"),
                vec!["b"],
            ),
            (
                "empty allowed list",
                json!({"mode": "AUTO", "allowedFunctionNames": []}),
                json!("auto"),
                vec!["a", "b", "c"],
            ),
        ];
        for (name, fcc, choice, left) in table {
            let req = with(json!({"tools": tools, "toolConfig": {"functionCallingConfig": fcc}}));
            let out = translate(&req);
            assert_eq!(
                out.get("tool_choice").cloned().unwrap_or(Value::Null),
                choice,
                "{name}"
            );
            let names: Vec<&str> = out["tools"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["function"]["name"].as_str().unwrap())
                .collect();
            assert_eq!(names, left, "{name}");
        }
        // Without tools, AUTO and NONE mean nothing to send.
        for mode in ["AUTO", "NONE"] {
            let req = with(json!({"toolConfig": {"functionCallingConfig": {"mode": mode}}}));
            let out = translate(&req);
            assert!(out.get("tool_choice").is_none(), "{mode}");
            assert!(out.get("tools").is_none(), "{mode}");
        }
    }

    #[test]
    fn thinking_config_table() {
        let table: Vec<(Value, Option<&str>)> = vec![
            (json!({"thinkingBudget": 0}), None),
            (json!({"thinkingBudget": -1}), None),
            (json!({"thinking_budget": 1}), Some("low")),
            (json!({"thinkingBudget": 1024}), Some("low")),
            (json!({"thinkingBudget": 2048}), Some("low")),
            (json!({"thinkingBudget": 2049}), Some("medium")),
            (json!({"thinkingBudget": 4096}), Some("medium")),
            (json!({"thinkingBudget": 8192}), Some("medium")),
            (json!({"thinkingBudget": 8193}), Some("high")),
            (
                json!({"thinkingBudget": 24576, "includeThoughts": true}),
                Some("high"),
            ),
            (json!({"includeThoughts": true}), None),
            (json!({"thinkingLevel": "MINIMAL"}), Some("minimal")),
            (json!({"thinking_level": "low"}), Some("low")),
            (json!({"thinkingLevel": "MEDIUM"}), Some("medium")),
            (json!({"thinkingLevel": "HIGH"}), Some("high")),
            (json!({"thinkingLevel": "THINKING_LEVEL_UNSPECIFIED"}), None),
        ];
        for (config, effort) in table {
            let out = translate(&with(
                json!({"generationConfig": {"thinkingConfig": config}}),
            ));
            assert_eq!(
                out.get("reasoning_effort").and_then(Value::as_str),
                effort,
                "{config}"
            );
        }
    }

    #[test]
    fn request_error_table() {
        let with_str =
            |extra: &str| format!(r#"{{"contents":[{{"parts":[{{"text":"x"}}]}}],{extra}}}"#);
        let parts = |parts: &str| format!(r#"{{"contents":[{{"role":"user","parts":{parts}}}]}}"#);
        let model_then_user = |model: &str, user: &str| {
            format!(
                r#"{{"contents":[{{"role":"user","parts":[{{"text":"q"}}]}},{{"role":"model","parts":{model}}},{{"role":"user","parts":{user}}}]}}"#
            )
        };
        let tools = r#""tools":[{"functionDeclarations":[{"name":"f"}]}]"#;
        let unsupported = Some("unsupported_parameter");
        let invalid = Some("invalid_value");
        // (case, body, param, code)
        let table: Vec<(&str, String, Option<&str>, Option<&str>)> = vec![
            ("not json", "{".into(), None, Some("invalid_json")),
            ("not an object", "[1]".into(), None, Some("invalid_json")),
            (
                "contents missing",
                "{}".into(),
                Some("contents"),
                Some("missing_required_parameter"),
            ),
            (
                "contents empty",
                r#"{"contents":[]}"#.into(),
                Some("contents"),
                Some("missing_required_parameter"),
            ),
            (
                "contents not an array",
                r#"{"contents":"hi"}"#.into(),
                Some("contents"),
                Some("invalid_type"),
            ),
            (
                "content not an object",
                r#"{"contents":["hi"]}"#.into(),
                Some("contents"),
                invalid,
            ),
            (
                "content without parts",
                r#"{"contents":[{"role":"user"}]}"#.into(),
                Some("contents"),
                invalid,
            ),
            ("empty parts", parts("[]"), Some("contents"), invalid),
            (
                "unknown role",
                r#"{"contents":[{"role":"system","parts":[{"text":"x"}]}]}"#.into(),
                Some("contents"),
                invalid,
            ),
            (
                "part not an object",
                parts(r#"["x"]"#),
                Some("contents"),
                invalid,
            ),
            (
                "text not a string",
                parts(r#"[{"text":1}]"#),
                Some("contents"),
                invalid,
            ),
            (
                "inline audio",
                parts(r#"[{"inlineData":{"mimeType":"audio/wav","data":"AA=="}}]"#),
                Some("contents"),
                unsupported,
            ),
            (
                "inline pdf",
                parts(r#"[{"inline_data":{"mime_type":"application/pdf","data":"AA=="}}]"#),
                Some("contents"),
                unsupported,
            ),
            (
                "inline without data",
                parts(r#"[{"inlineData":{"mimeType":"image/png"}}]"#),
                Some("contents"),
                invalid,
            ),
            (
                "gs:// file",
                parts(r#"[{"fileData":{"mimeType":"image/png","fileUri":"gs://b/cat.png"}}]"#),
                Some("contents"),
                unsupported,
            ),
            (
                "Files API file",
                parts(
                    r#"[{"fileData":{"mimeType":"image/png","fileUri":"https://generativelanguage.googleapis.com/v1beta/files/abc"}}]"#,
                ),
                Some("contents"),
                unsupported,
            ),
            (
                "video file",
                parts(
                    r#"[{"fileData":{"mimeType":"video/mp4","fileUri":"https://www.youtube.com/watch?v=9hE5-98ZeCg"}}]"#,
                ),
                Some("contents"),
                unsupported,
            ),
            (
                "file of unknown kind",
                parts(r#"[{"fileData":{"fileUri":"https://example.com/doc"}}]"#),
                Some("contents"),
                unsupported,
            ),
            (
                "code execution part",
                parts(r#"[{"executableCode":{"language":"PYTHON","code":"1"}}]"#),
                Some("contents"),
                unsupported,
            ),
            (
                "video metadata",
                parts(r#"[{"text":"x","videoMetadata":{"fps":1}}]"#),
                Some("contents"),
                unsupported,
            ),
            (
                "call in a user turn",
                parts(r#"[{"functionCall":{"name":"f","args":{}}}]"#),
                Some("contents"),
                invalid,
            ),
            (
                "call without name",
                model_then_user(r#"[{"functionCall":{"args":{}}}]"#, r#"[{"text":"x"}]"#),
                Some("contents"),
                invalid,
            ),
            (
                "call args not an object",
                model_then_user(
                    r#"[{"functionCall":{"name":"f","args":[1]}}]"#,
                    r#"[{"text":"x"}]"#,
                ),
                Some("contents"),
                invalid,
            ),
            (
                "response in a model turn",
                model_then_user(
                    r#"[{"functionResponse":{"name":"f","response":{}}}]"#,
                    r#"[{"text":"x"}]"#,
                ),
                Some("contents"),
                invalid,
            ),
            (
                "image in a model turn",
                model_then_user(
                    r#"[{"inlineData":{"mimeType":"image/png","data":"AA=="}}]"#,
                    r#"[{"text":"x"}]"#,
                ),
                Some("contents"),
                unsupported,
            ),
            (
                "response without a call",
                parts(r#"[{"functionResponse":{"name":"f","response":{}}}]"#),
                Some("contents"),
                invalid,
            ),
            (
                "response to an answered call",
                model_then_user(
                    r#"[{"functionCall":{"name":"f"}}]"#,
                    r#"[{"functionResponse":{"name":"f","response":{}}},{"functionResponse":{"name":"f","response":{}}}]"#,
                ),
                Some("contents"),
                invalid,
            ),
            (
                "multimodal function response",
                model_then_user(
                    r#"[{"functionCall":{"name":"f"}}]"#,
                    r#"[{"functionResponse":{"name":"f","response":{},"parts":[{"inlineData":{"mimeType":"image/png","data":"AA=="}}]}}]"#,
                ),
                Some("contents"),
                unsupported,
            ),
            (
                "system instruction with an image",
                with_str(
                    r#""systemInstruction":{"parts":[{"inlineData":{"mimeType":"image/png","data":"AA=="}}]}"#,
                ),
                Some("systemInstruction"),
                unsupported,
            ),
            (
                "system instruction of a number",
                with_str(r#""systemInstruction":3"#),
                Some("systemInstruction"),
                Some("invalid_type"),
            ),
            (
                "topK",
                with_str(r#""generationConfig":{"topK":40}"#),
                Some("generationConfig"),
                unsupported,
            ),
            (
                "top_k",
                with_str(r#""generationConfig":{"top_k":40}"#),
                Some("generationConfig"),
                unsupported,
            ),
            (
                "logprobs",
                with_str(r#""generationConfig":{"responseLogprobs":true,"logprobs":3}"#),
                Some("generationConfig"),
                unsupported,
            ),
            (
                "image output",
                with_str(r#""generationConfig":{"responseModalities":["TEXT","IMAGE"]}"#),
                Some("generationConfig"),
                unsupported,
            ),
            (
                "speech",
                with_str(r#""generationConfig":{"speechConfig":{"voiceConfig":{}}}"#),
                Some("generationConfig"),
                unsupported,
            ),
            (
                "enum output",
                with_str(
                    r#""generationConfig":{"responseMimeType":"text/x.enum","responseSchema":{"type":"STRING","enum":["a"]}}"#,
                ),
                Some("generationConfig"),
                unsupported,
            ),
            (
                "schema without json",
                with_str(r#""generationConfig":{"responseSchema":{"type":"STRING"}}"#),
                Some("generationConfig"),
                invalid,
            ),
            (
                "two schemas",
                with_str(
                    r#""generationConfig":{"responseMimeType":"application/json","responseSchema":{},"responseJsonSchema":{}}"#,
                ),
                Some("generationConfig"),
                invalid,
            ),
            (
                "zero output tokens",
                with_str(r#""generationConfig":{"maxOutputTokens":0}"#),
                Some("generationConfig"),
                invalid,
            ),
            (
                "output tokens as words",
                with_str(r#""generationConfig":{"maxOutputTokens":"ten"}"#),
                Some("generationConfig"),
                Some("invalid_type"),
            ),
            (
                "temperature as a string",
                with_str(r#""generationConfig":{"temperature":"hot"}"#),
                Some("generationConfig"),
                Some("invalid_type"),
            ),
            (
                "seed as a float",
                with_str(r#""generationConfig":{"seed":1.5}"#),
                Some("generationConfig"),
                Some("invalid_type"),
            ),
            (
                "stop sequence not a string",
                with_str(r#""generationConfig":{"stopSequences":["a",1]}"#),
                Some("generationConfig"),
                Some("invalid_type"),
            ),
            (
                "generation config not an object",
                with_str(r#""generationConfig":[]"#),
                Some("generationConfig"),
                Some("invalid_type"),
            ),
            (
                "budget and level",
                with_str(
                    r#""generationConfig":{"thinkingConfig":{"thinkingBudget":10,"thinkingLevel":"LOW"}}"#,
                ),
                Some("generationConfig.thinkingConfig"),
                invalid,
            ),
            (
                "unknown level",
                with_str(r#""generationConfig":{"thinkingConfig":{"thinkingLevel":"MAX"}}"#),
                Some("generationConfig.thinkingConfig"),
                invalid,
            ),
            (
                "negative budget",
                with_str(r#""generationConfig":{"thinkingConfig":{"thinkingBudget":-5}}"#),
                Some("generationConfig.thinkingConfig"),
                invalid,
            ),
            (
                "google search",
                with_str(r#""tools":[{"googleSearch":{}}]"#),
                Some("tools"),
                unsupported,
            ),
            (
                "code execution",
                with_str(
                    r#""tools":[{"functionDeclarations":[{"name":"f"}]},{"code_execution":{}}]"#,
                ),
                Some("tools"),
                unsupported,
            ),
            (
                "tools not an array",
                with_str(r#""tools":{}"#),
                Some("tools"),
                Some("invalid_type"),
            ),
            (
                "declaration without name",
                with_str(r#""tools":[{"functionDeclarations":[{"description":"d"}]}]"#),
                Some("tools"),
                invalid,
            ),
            (
                "both parameter schemas",
                with_str(
                    r#""tools":[{"functionDeclarations":[{"name":"f","parameters":{},"parametersJsonSchema":{}}]}]"#,
                ),
                Some("tools"),
                invalid,
            ),
            (
                "allowed names with AUTO",
                with_str(&format!(
                    r#"{tools},"toolConfig":{{"functionCallingConfig":{{"mode":"AUTO","allowedFunctionNames":["f"]}}}}"#
                )),
                Some("toolConfig"),
                invalid,
            ),
            (
                "allowed name not declared",
                with_str(&format!(
                    r#"{tools},"toolConfig":{{"functionCallingConfig":{{"mode":"ANY","allowedFunctionNames":["g"]}}}}"#
                )),
                Some("toolConfig"),
                invalid,
            ),
            (
                "unknown mode",
                with_str(&format!(
                    r#"{tools},"toolConfig":{{"functionCallingConfig":{{"mode":"SOMETIMES"}}}}"#
                )),
                Some("toolConfig"),
                invalid,
            ),
            (
                "ANY without tools",
                with_str(r#""toolConfig":{"functionCallingConfig":{"mode":"ANY"}}"#),
                Some("toolConfig"),
                invalid,
            ),
            (
                "cached content",
                with_str(r#""cachedContent":"cachedContents/abc""#),
                Some("cachedContent"),
                unsupported,
            ),
            (
                "unknown field",
                with_str(r#""serviceTier":"flex""#),
                None,
                unsupported,
            ),
            (
                "safety settings not an array",
                with_str(r#""safetySettings":{}"#),
                Some("safetySettings"),
                Some("invalid_type"),
            ),
        ];
        for (name, body, param, code) in table {
            let err = gemini_request_to_chat(body.as_bytes(), MODEL, false).expect_err(name);
            assert_eq!(err.status, 400, "{name}");
            assert_eq!(err.kind, "invalid_request_error", "{name}");
            assert_eq!(err.param, param, "{name}: {}", err.message);
            assert_eq!(err.code, code, "{name}: {}", err.message);
            assert!(!err.message.is_empty(), "{name}");
        }
    }

    #[test]
    fn error_messages_point_at_the_part() {
        let body = br#"{"contents":[{"parts":[{"text":"a"}]},{"role":"model","parts":[{"text":"b"}]},{"parts":[{"text":"c"},{"inlineData":{"mimeType":"audio/mp3","data":"AA=="}}]}]}"#;
        let err = gemini_request_to_chat(body, MODEL, false).unwrap_err();
        assert!(
            err.message.contains("contents[2].parts[1].inlineData"),
            "{}",
            err.message
        );
        assert!(err.message.contains("audio/mp3"), "{}", err.message);
        let body = br#"{"contents":[{"parts":[{"text":"a"}]}],"generationConfig":{"topK":3}}"#;
        let err = gemini_request_to_chat(body, MODEL, false).unwrap_err();
        assert!(err.message.contains("topK"), "{}", err.message);
    }

    // ----- errors ------------------------------------------------------------

    #[test]
    fn gateway_errors_in_google_shape() {
        let err = ApiError::invalid_request(
            Some("unsupported_parameter"),
            "generationConfig.topK is not supported.".into(),
        )
        .with_param("generationConfig");
        let v: Value = serde_json::from_slice(&error_body(&err)).unwrap();
        assert_eq!(
            v,
            json!({"error": {"code": 400, "message": "generationConfig.topK is not supported.",
                             "status": "INVALID_ARGUMENT", "details": [{
                                 "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                                 "reason": "UNSUPPORTED_PARAMETER", "domain": "meshllm",
                                 "metadata": {"param": "generationConfig"}}]}})
        );
        let table = [
            (400, "INVALID_ARGUMENT"),
            (401, "UNAUTHENTICATED"),
            (403, "PERMISSION_DENIED"),
            (404, "NOT_FOUND"),
            (409, "ABORTED"),
            (413, "INVALID_ARGUMENT"),
            (418, "FAILED_PRECONDITION"),
            (429, "RESOURCE_EXHAUSTED"),
            (500, "INTERNAL"),
            (501, "UNIMPLEMENTED"),
            (502, "UNAVAILABLE"),
            (503, "UNAVAILABLE"),
            (504, "DEADLINE_EXCEEDED"),
            (507, "INTERNAL"),
        ];
        for (status, name) in table {
            let err = ApiError::new(status, "server_error", None, "m".into());
            let v: Value = serde_json::from_slice(&error_body(&err)).unwrap();
            assert_eq!(
                v,
                json!({"error": {"code": status, "message": "m", "status": name}}),
                "{status}"
            );
        }
    }

    #[test]
    fn provider_errors_in_google_shape() {
        let openai = br#"{"error":{"message":"Rate limit reached for gpt-4.1","type":"rate_limit_error","param":null,"code":"rate_limit_exceeded"}}"#;
        let v: Value = serde_json::from_slice(&chat_error_to_gemini(429, openai)).unwrap();
        assert_eq!(
            v,
            json!({"error": {"code": 429, "message": "Rate limit reached for gpt-4.1",
                             "status": "RESOURCE_EXHAUSTED", "details": [{
                                 "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                                 "reason": "RATE_LIMIT_EXCEEDED", "domain": "meshllm"}]}})
        );
        let v: Value = serde_json::from_slice(&chat_error_to_gemini(
            401,
            br#"{"error":{"message":"bad key","type":"authentication_error"}}"#,
        ))
        .unwrap();
        assert_eq!(
            v,
            json!({"error": {"code": 401, "message": "bad key", "status": "UNAUTHENTICATED"}})
        );
        let v: Value =
            serde_json::from_slice(&chat_error_to_gemini(503, b"<html>upstream down</html>"))
                .unwrap();
        assert_eq!(v["error"]["status"], "UNAVAILABLE");
        assert_eq!(
            v["error"]["message"],
            "The provider returned HTTP 503: <html>upstream down</html>"
        );
        let v: Value = serde_json::from_slice(&chat_error_to_gemini(500, b"")).unwrap();
        assert_eq!(
            v["error"]["message"],
            "The provider returned HTTP 500 with no details."
        );
        let long = "é".repeat(1000);
        let v: Value = serde_json::from_slice(&chat_error_to_gemini(502, long.as_bytes())).unwrap();
        assert!(v["error"]["message"].as_str().unwrap().len() < 600);
    }

    // ----- non-streamed responses -----------------------------------------

    fn respond(body: &Value) -> Value {
        let out = chat_response_to_gemini(&serde_json::to_vec(body).unwrap()).unwrap();
        serde_json::from_slice(&out).unwrap()
    }

    #[test]
    fn text_response_maps_every_field() {
        let openai = json!({
            "id": "chatcmpl-123", "object": "chat.completion", "created": 1,
            "model": "gpt-4.1-2025-04-14",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi there.",
                                                  "refusal": null},
                         "logprobs": null, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18}
        });
        assert_eq!(
            respond(&openai),
            json!({
                "candidates": [{"content": {"parts": [{"text": "Hi there."}], "role": "model"},
                                "finishReason": "STOP", "index": 0}],
                "usageMetadata": {"promptTokenCount": 12, "candidatesTokenCount": 6,
                                  "totalTokenCount": 18},
                "modelVersion": "gpt-4.1-2025-04-14",
                "responseId": "chatcmpl-123"
            })
        );
    }

    #[test]
    fn tool_response_with_reasoning_and_cached_usage() {
        let out = respond(&serde_json::from_str(TOOL_RESPONSE).unwrap());
        assert_eq!(
            out,
            json!({
                "candidates": [{"content": {"parts": [
                    {"text": "Two independent lookups; call both tools.", "thought": true},
                    {"text": "I'll check both cities."},
                    {"functionCall": {"id": "call_8JkV1rFq2cWmzYx0aQ4tLp3N", "name": "get_weather",
                                      "args": {"location": "Paris, France", "unit": "celsius"}}},
                    {"functionCall": {"id": "call_Q7sD2gHk9LmNp0Rt5VwXy1Zb", "name": "get_weather",
                                      "args": {"location": "Tokyo, Japan"}}}
                ], "role": "model"}, "finishReason": "STOP", "index": 0}],
                "usageMetadata": {"promptTokenCount": 2006, "candidatesTokenCount": 44,
                                  "cachedContentTokenCount": 1920, "thoughtsTokenCount": 256,
                                  "totalTokenCount": 2306},
                "modelVersion": "o4-mini-2025-04-16",
                "responseId": "chatcmpl-BKwq1Zs3k0VAbCQx8sJ6Mnh2Xy4Pq"
            })
        );
    }

    #[test]
    fn response_edge_cases() {
        let openai = json!({
            "id": "x", "model": "m",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": null,
                                         "refusal": "I can't help with that."},
                 "finish_reason": "content_filter"},
                {"index": 1, "message": {"role": "assistant", "content": [
                    {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                 "finish_reason": "length"},
                {"index": 2, "message": {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}},
                    {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{oops"}}]},
                 "finish_reason": "tool_calls"},
                {"index": 3, "message": {"role": "assistant", "content": "", "reasoning": "r"},
                 "finish_reason": "something_new"},
                {"index": 4, "message": {"role": "assistant", "content": ""}, "finish_reason": null}
            ]
        });
        let out = respond(&openai);
        assert_eq!(
            out["candidates"],
            json!([
                {"content": {"parts": [{"text": "I can't help with that."}], "role": "model"},
                 "finishReason": "SAFETY", "index": 0},
                {"content": {"parts": [{"text": "ab"}], "role": "model"},
                 "finishReason": "MAX_TOKENS", "index": 1},
                {"content": {"parts": [
                    {"functionCall": {"id": "c1", "name": "f", "args": {}}},
                    {"functionCall": {"id": "c2", "name": "g", "args": {"arguments": "{oops"}}}],
                 "role": "model"}, "finishReason": "STOP", "index": 2},
                {"content": {"parts": [{"text": "r", "thought": true}], "role": "model"},
                 "finishReason": "OTHER", "index": 3},
                {"content": {"role": "model"}, "index": 4}
            ])
        );
        assert!(out.get("usageMetadata").is_none());
        assert!(chat_response_to_gemini(b"not json").is_err());
        assert!(chat_response_to_gemini(br#"{"id":"x"}"#).is_err());
    }

    // ----- streaming ---------------------------------------------------------

    fn run_pieces(pieces: &[&[u8]]) -> Vec<u8> {
        let mut t = ChatStreamToGemini::new();
        let mut out = Vec::new();
        for piece in pieces {
            t.push(piece, &mut out);
        }
        t.finish(&mut out);
        out
    }

    fn run(input: &[u8]) -> Vec<u8> {
        run_pieces(&[input])
    }

    /// The JSON of every event, checking Google's framing on the way.
    fn parse_events(out: &[u8]) -> Vec<Value> {
        let text = std::str::from_utf8(out).unwrap();
        assert!(text.is_empty() || text.ends_with("\r\n\r\n"), "{text}");
        text.split_terminator("\r\n\r\n")
            .map(|e| {
                let data = e.strip_prefix("data: ").unwrap_or_else(|| panic!("{e}"));
                assert!(!data.contains('\n') && !data.contains('\r'), "{data}");
                serde_json::from_str(data).unwrap()
            })
            .collect()
    }

    /// All at once, byte by byte, and split in two at every position.
    fn assert_chunking_invariant(input: &[u8]) -> Vec<u8> {
        let whole = run(input);
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(run_pieces(&bytes), whole, "byte by byte");
        for at in 0..=input.len() {
            let (a, b) = input.split_at(at);
            assert_eq!(run_pieces(&[a, b]), whole, "split at {at}");
        }
        whole
    }

    /// What google-genai's chat sessions need of every chunk to keep the
    /// turn in their history: candidates[0].content.parts, none empty.
    fn assert_chat_history_valid(events: &[Value]) {
        for e in events {
            if e.get("error").is_some() {
                continue;
            }
            let parts = e["candidates"][0]["content"]["parts"].as_array();
            let parts = parts.unwrap_or_else(|| panic!("no parts: {e}"));
            assert!(!parts.is_empty(), "{e}");
            for p in parts {
                assert!(!p.as_object().unwrap().is_empty(), "{e}");
            }
            assert_eq!(e["candidates"][0]["content"]["role"], "model");
        }
    }

    #[test]
    fn text_stream_translates_identically_however_it_is_chunked() {
        let out = assert_chunking_invariant(TEXT_STREAM.as_bytes());
        let head = |parts: Value| {
            json!({"candidates": [{"content": {"parts": parts, "role": "model"}, "index": 0}],
                   "modelVersion": "o4-mini-2025-04-16",
                   "responseId": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG"})
        };
        let events = parse_events(&out);
        assert_eq!(
            events,
            vec![
                head(json!([{"text": "The user greets me. ", "thought": true}])),
                head(json!([{"text": "Answer briefly.", "thought": true}])),
                head(json!([{"text": "Bonjour, café ☕"}])),
                head(json!([{"text": " — ça va? 👋\nSecond line with \"quotes\"."}])),
                json!({"candidates": [{"content": {"parts": [{"text": ""}], "role": "model"},
                                       "finishReason": "STOP", "index": 0}],
                       "usageMetadata": {"promptTokenCount": 1125, "candidatesTokenCount": 50,
                                         "cachedContentTokenCount": 1024,
                                         "thoughtsTokenCount": 192, "totalTokenCount": 1367},
                       "modelVersion": "o4-mini-2025-04-16",
                       "responseId": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG"}),
            ]
        );
        assert_chat_history_valid(&events);
    }

    #[test]
    fn tool_stream_sends_each_call_whole() {
        let out = assert_chunking_invariant(TOOL_STREAM.as_bytes());
        let events = parse_events(&out);
        let candidates: Vec<&Value> = events.iter().map(|e| &e["candidates"][0]).collect();
        assert_eq!(
            candidates,
            vec![
                &json!({"content": {"parts": [{"text": "Checking both."}], "role": "model"},
                        "index": 0}),
                // Sent as soon as the second call starts.
                &json!({"content": {"parts": [{"functionCall": {
                            "id": "call_kIYtFDwOJSbsu6cyZ3uGnFsT", "name": "get_weather",
                            "args": {"location": "Paris, France", "unit": "celsius"}}}],
                        "role": "model"}, "index": 0}),
                &json!({"content": {"parts": [{"functionCall": {
                            "id": "call_Xu2Aa2Lp5WbFm6gq0S3T8Mt1", "name": "get_time",
                            "args": {"timezone": "Europe/Paris"}}}],
                        "role": "model"}, "finishReason": "STOP", "index": 0}),
            ]
        );
        assert!(events[..2].iter().all(|e| e.get("usageMetadata").is_none()));
        assert_eq!(
            events[2]["usageMetadata"],
            json!({"promptTokenCount": 840, "candidatesTokenCount": 89, "totalTokenCount": 929})
        );
        assert_chat_history_valid(&events);
    }

    #[test]
    fn crlf_input_and_merged_events_give_the_same_output() {
        for fixture in [TEXT_STREAM, TOOL_STREAM] {
            let lf = run(fixture.as_bytes());
            for ending in ["\r\n", "\r"] {
                let converted = fixture.replace('\n', ending);
                assert_eq!(run(converted.as_bytes()), lf, "{ending:?}");
                let bytes: Vec<&[u8]> = converted.as_bytes().chunks(1).collect();
                assert_eq!(run_pieces(&bytes), lf, "{ending:?} byte by byte");
            }
            // Several events per push, cut across event boundaries.
            let groups: Vec<String> = fixture
                .split_inclusive("\n\n")
                .collect::<Vec<_>>()
                .chunks(3)
                .map(|c| c.concat())
                .collect();
            let pieces: Vec<&[u8]> = groups.iter().map(|g| g.as_bytes()).collect();
            assert_eq!(run_pieces(&pieces), lf);
            // Comments and keep-alives are ignored.
            let noisy = fixture.replace("data: [DONE]", ": keep-alive\n\ndata: [DONE]");
            assert_eq!(run(noisy.as_bytes()), lf);
        }
    }

    /// Output appears as soon as the upstream event producing it completes;
    /// only a finishing event waits for the next one (the usage) and tool
    /// arguments for their call to complete.
    #[test]
    fn nothing_is_held_back_longer_than_needed() {
        let upstream: Vec<&str> = TOOL_STREAM.split_inclusive("\n\n").collect();
        let mut t = ChatStreamToGemini::new();
        let mut out = Vec::new();
        let mut produced = Vec::new();
        for event in &upstream {
            let before = out.len();
            let (body, end) = event.split_at(event.len() - 1);
            t.push(body.as_bytes(), &mut out);
            assert_eq!(out.len(), before, "output before the event ended: {event}");
            t.push(end.as_bytes(), &mut out);
            produced.push(out.len() > before);
        }
        // role, text, call 0 start, 2 deltas, call 1 start (call 0 out),
        // 2 deltas, finish (held), usage (finish + usage out), [DONE].
        assert_eq!(
            produced,
            vec![false, true, false, false, false, false, true, false, false, false, true, false]
        );
        assert_eq!(out, run(TOOL_STREAM.as_bytes()));
    }

    #[test]
    fn usage_is_reported_to_the_filter() {
        let mut t = ChatStreamToGemini::new();
        assert_eq!(t.usage(), None);
        let mut out = Vec::new();
        t.push(TEXT_STREAM.as_bytes(), &mut out);
        assert_eq!(
            t.usage(),
            Some(Usage {
                input_tokens: 1125,
                output_tokens: 242,
                cached_input_tokens: 1024,
                reasoning_tokens: 192
            })
        );
        let mut t = ChatStreamToGemini::new();
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
    }

    #[test]
    fn error_event_ends_the_stream() {
        let head: String = TEXT_STREAM.split_inclusive("\n\n").take(4).collect();
        let input = format!(
            "{head}data: {{\"error\":{{\"message\":\"Rate limit reached\",\"type\":\"rate_limit_error\",\"param\":null,\"code\":\"rate_limit_exceeded\"}}}}\n\n\
             data: {{\"id\":\"x\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"late\"}}}}]}}\n\ndata: [DONE]\n\n"
        );
        let mut t = ChatStreamToGemini::new();
        let mut out = Vec::new();
        t.push(input.as_bytes(), &mut out);
        let len = out.len();
        t.finish(&mut out);
        t.push(b"data: [DONE]\n\n", &mut out);
        assert_eq!(out.len(), len, "nothing after an error");
        let events = parse_events(&out);
        assert_eq!(events.len(), 4);
        assert_eq!(
            events[3],
            json!({"error": {"code": 429, "message": "Rate limit reached",
                             "status": "RESOURCE_EXHAUSTED", "details": [{
                                 "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                                 "reason": "RATE_LIMIT_EXCEEDED", "domain": "meshllm"}]}})
        );
        assert!(!String::from_utf8_lossy(&out).contains("late"));
    }

    #[test]
    fn error_event_statuses() {
        let table = [
            (
                json!({"message": "m", "type": "server_error", "code": "stream_interrupted"}),
                502,
                "UNAVAILABLE",
            ),
            (
                json!({"message": "m", "type": "server_error", "code": "overloaded"}),
                503,
                "UNAVAILABLE",
            ),
            (
                json!({"message": "m", "type": "server_error", "code": "provider_timeout"}),
                504,
                "DEADLINE_EXCEEDED",
            ),
            (
                json!({"message": "m", "type": "server_error", "code": null}),
                500,
                "INTERNAL",
            ),
            (
                json!({"message": "m", "type": "invalid_request_error"}),
                400,
                "INVALID_ARGUMENT",
            ),
            (
                json!({"message": "m", "type": "authentication_error"}),
                401,
                "UNAUTHENTICATED",
            ),
            (
                json!({"message": "m", "type": "permission_error"}),
                403,
                "PERMISSION_DENIED",
            ),
            (
                json!({"message": "m", "type": "not_found_error"}),
                404,
                "NOT_FOUND",
            ),
            (
                json!({"message": "m", "code": 429}),
                429,
                "RESOURCE_EXHAUSTED",
            ),
            (json!({}), 500, "INTERNAL"),
        ];
        for (error, code, status) in table {
            let input = format!("data: {}\n\n", json!({"error": error}));
            let events = parse_events(&run(input.as_bytes()));
            assert_eq!(events.len(), 1, "{error}");
            assert_eq!(events[0]["error"]["code"], code, "{error}");
            assert_eq!(events[0]["error"]["status"], status, "{error}");
            assert!(events[0]["error"]["message"].is_string(), "{error}");
        }
    }

    #[test]
    fn truncated_stream_ends_with_an_error_event() {
        for fixture in [TEXT_STREAM, TOOL_STREAM] {
            let upstream: Vec<&str> = fixture.split_inclusive("\n\n").collect();
            let done_len = upstream.last().unwrap().len();
            let cuts = [
                0,
                fixture.len() / 2,
                // Everything but [DONE]: finished and counted, yet not complete.
                fixture.len() - done_len,
                // Inside [DONE].
                fixture.len() - 3,
            ];
            for cut in cuts {
                let out = run(&fixture.as_bytes()[..cut]);
                let events = parse_events(&out);
                let last = events.last().unwrap();
                assert_eq!(
                    last,
                    &json!({"error": {"code": 502,
                        "message": "The provider's stream ended before completion; the answer is incomplete.",
                        "status": "UNAVAILABLE", "details": [{
                            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                            "reason": "STREAM_INTERRUPTED", "domain": "meshllm"}]}}),
                    "cut {cut}"
                );
                assert_eq!(
                    events.iter().filter(|e| e.get("error").is_some()).count(),
                    1
                );
                assert_chat_history_valid(&events);
            }
        }
        // Cut after the finish, before the usage: the held finish reason
        // never goes out, it would mark the broken answer complete.
        let upstream: Vec<&str> = TEXT_STREAM.split_inclusive("\n\n").collect();
        let head: String = upstream[..6].concat();
        let events = parse_events(&run(head.as_bytes()));
        assert_eq!(events.len(), 5);
        assert!(events
            .iter()
            .all(|e| e.pointer("/candidates/0/finishReason").is_none()));
        assert!(events[4].get("error").is_some());
    }

    #[test]
    fn finish_is_idempotent_and_silent_after_done() {
        let mut t = ChatStreamToGemini::new();
        let mut out = Vec::new();
        t.push(TEXT_STREAM.as_bytes(), &mut out);
        let len = out.len();
        t.finish(&mut out);
        t.finish(&mut out);
        t.push(TEXT_STREAM.as_bytes(), &mut out);
        assert_eq!(out.len(), len);
        assert!(!String::from_utf8_lossy(&out).contains("error"));

        let mut t = ChatStreamToGemini::new();
        let mut out = Vec::new();
        t.finish(&mut out);
        let len = out.len();
        t.finish(&mut out);
        assert_eq!(out.len(), len);
    }

    #[test]
    fn unusual_streams() {
        let chunk = |choices: Value| {
            format!(
                "data: {}\n\n",
                json!({"id": "c", "model": "m", "choices": choices})
            )
        };
        // Usage on the finishing chunk itself; several choices; calls
        // without index; a call still open at [DONE]; a usage chunk with
        // nothing to go with; comments.
        let input = [
            chunk(json!([{"index": 0, "delta": {"role": "assistant", "content": ""}},
                         {"index": 1, "delta": {"role": "assistant", "content": "B"}}])),
            ": keep-alive\n\n".to_string(),
            chunk(json!([{"index": 0, "delta": {"tool_calls": [
                {"id": "x1", "type": "function", "function": {"name": "f", "arguments": "{\"a\""}}]}}])),
            chunk(json!([{"index": 0, "delta": {"tool_calls": [
                {"function": {"arguments": ":1}"}}]}}])),
            chunk(json!([{"index": 0, "delta": {"tool_calls": [
                {"id": "x2", "type": "function", "function": {"name": "g", "arguments": "{}"}}]}}])),
            chunk(json!([{"index": 1, "delta": {}, "finish_reason": "length"}])),
            chunk(json!([{"index": 1, "delta": {"content": "late"}}])),
            "data: [DONE]\n\n".to_string(),
        ]
        .concat();
        let events = parse_events(&run(input.as_bytes()));
        let candidates: Vec<&Value> = events.iter().map(|e| &e["candidates"]).collect();
        assert_eq!(
            candidates,
            vec![
                &json!([{"content": {"parts": [{"text": "B"}], "role": "model"}, "index": 1}]),
                &json!([{"content": {"parts": [{"functionCall": {"id": "x1", "name": "f", "args": {"a": 1}}}],
                         "role": "model"}, "index": 0}]),
                // The finishing event of choice 1 waits, then goes out before more content.
                &json!([{"content": {"parts": [{"text": ""}], "role": "model"},
                         "finishReason": "MAX_TOKENS", "index": 1}]),
                &json!([{"content": {"parts": [{"text": "late"}], "role": "model"}, "index": 1}]),
                &json!([{"content": {"parts": [{"functionCall": {"id": "x2", "name": "g", "args": {}}}],
                         "role": "model"}, "index": 0}]),
            ]
        );

        let input = [
            format!(
                "data: {}\n\n",
                json!({"id": "c", "model": "m", "choices": [
                {"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})
            ),
            format!(
                "data: {}\n\n",
                json!({"id": "c", "model": "m", "choices": [],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})
            ),
            "data: [DONE]\n\n".to_string(),
        ]
        .concat();
        let events = parse_events(&run(input.as_bytes()));
        assert_eq!(events.len(), 2);
        assert_eq!(
            events[0]["candidates"],
            json!([{"content": {"parts": [{"text": "hi"}], "role": "model"},
                    "finishReason": "STOP", "index": 0}])
        );
        assert_eq!(events[0]["usageMetadata"]["totalTokenCount"], 4);
        // A usage chunk with nothing waiting still carries a part.
        assert_eq!(
            events[1]["candidates"],
            json!([{"content": {"parts": [{"text": ""}], "role": "model"}, "index": 0}])
        );
        assert_chat_history_valid(&events);
    }

    /// Anthropic provider -> pivot -> Gemini caller, as the filter chains them.
    #[test]
    fn chains_behind_a_provider_translator() {
        let anthropic = include_str!("../../../tests/fixtures/anthropic/tool_stream.sse");
        let mut chain = Chain::new(
            MessagesStreamToChat::new(true, 1),
            ChatStreamToGemini::new(),
        );
        let mut out = Vec::new();
        for piece in anthropic.as_bytes().chunks(7) {
            chain.push(piece, &mut out);
        }
        chain.finish(&mut out);
        let events = parse_events(&out);
        assert_chat_history_valid(&events);
        let parts: Vec<Value> = events
            .iter()
            .flat_map(|e| {
                e["candidates"][0]["content"]["parts"]
                    .as_array()
                    .unwrap()
                    .clone()
            })
            .collect();
        let calls: Vec<&Value> = parts.iter().filter_map(|p| p.get("functionCall")).collect();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0]["name"], "get_weather");
        assert_eq!(
            calls[0]["args"],
            json!({"location": "Paris, France", "unit": "celsius"})
        );
        assert_eq!(calls[1]["name"], "get_time");
        let last = events.last().unwrap();
        assert_eq!(last["candidates"][0]["finishReason"], "STOP");
        assert!(last["usageMetadata"]["totalTokenCount"].as_u64().unwrap() > 0);
        assert!(!String::from_utf8_lossy(&out).contains("\"error\""));

        // Broken upstream: the Anthropic side's interruption surfaces once, in Google's shape.
        let mut chain = Chain::new(
            MessagesStreamToChat::new(true, 1),
            ChatStreamToGemini::new(),
        );
        let mut out = Vec::new();
        chain.push(&anthropic.as_bytes()[..anthropic.len() / 2], &mut out);
        chain.finish(&mut out);
        let events = parse_events(&out);
        let last = events.last().unwrap();
        assert_eq!(last["error"]["code"], 502);
        assert_eq!(last["error"]["status"], "UNAVAILABLE");
        assert_eq!(
            events.iter().filter(|e| e.get("error").is_some()).count(),
            1
        );
    }
}
