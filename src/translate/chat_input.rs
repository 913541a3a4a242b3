//! Reading what the translators take in, shared by all of them: OpenAI chat
//! request parts (message text, assistant turns), the caller mistakes they
//! report the same way in OpenAI's error shape (`param` names the field,
//! `code` says what is wrong), and the quoting of provider error bodies.

use serde_json::{Map, Value};

use crate::core::api_error::ApiError;

/// A JSON value's type, as error messages name it.
pub fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// 400 `invalid_type`: `param` is not the type the API wants.
pub fn invalid_type(param: &'static str, want: &str, got: &Value) -> ApiError {
    ApiError::invalid_request(
        Some("invalid_type"),
        format!(
            "Invalid type for '{param}': expected {want}, but got {}.",
            json_type(got)
        ),
    )
    .with_param(param)
}

/// 400 `invalid_value`: `param` has a value the API does not accept.
pub fn invalid_value(param: &'static str, message: String) -> ApiError {
    ApiError::invalid_request(Some("invalid_value"), message).with_param(param)
}

/// 400 `unsupported_parameter`: the target cannot do what `param` asks.
pub fn unsupported(param: &'static str, message: String) -> ApiError {
    ApiError::invalid_request(Some("unsupported_parameter"), message).with_param(param)
}

/// 400 `invalid_value` about `messages`.
pub fn bad_message(message: String) -> ApiError {
    invalid_value("messages", message)
}

/// The text of an OpenAI message `content` (a string, or the text parts of
/// an array) where the target only takes text.
pub fn plain_text(content: &Value, i: usize) -> Result<String, ApiError> {
    match content {
        Value::Null => Ok(String::new()),
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => Ok(parts
            .iter()
            .filter(|p| p.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect()),
        other => Err(bad_message(format!(
            "messages[{i}].content must be a string or an array of text parts, not {}.",
            json_type(other)
        ))),
    }
}

/// `s` starts with `prefix`, ASCII case ignored (URL schemes, `data:`).
pub fn has_prefix_ignore_case(s: &str, prefix: &str) -> bool {
    s.get(..prefix.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
}

/// At most 512 bytes of a provider's error body as text (an HTML page's
/// title), cut at a character boundary, for quoting in an error message.
pub fn quoted(body: &[u8]) -> String {
    crate::core::api_error::readable_text(body)
}

/// An assistant message's content and tool calls as the target's blocks:
/// text first (empty text dropped), then one block per tool call, made by
/// `tool_block(id, name, input)` with the arguments parsed into an object.
/// `provider` names the target in error messages.
pub fn assistant_blocks(
    msg: &Map<String, Value>,
    i: usize,
    provider: &str,
    text_block: fn(String) -> Value,
    tool_block: fn(&str, &str, Value) -> Value,
) -> Result<Vec<Value>, ApiError> {
    let mut blocks = Vec::new();
    match msg.get("content").unwrap_or(&Value::Null) {
        Value::Null => {}
        Value::String(s) => {
            if !s.is_empty() {
                blocks.push(text_block(s.clone()));
            }
        }
        Value::Array(parts) => {
            for (j, part) in parts.iter().enumerate() {
                let kind = part.get("type").and_then(Value::as_str).unwrap_or_default();
                let key = match kind {
                    "text" => "text",
                    "refusal" => "refusal",
                    _ => {
                        return Err(bad_message(format!(
                            "messages[{i}].content[{j}]: assistant content parts must be of \
                             type 'text' or 'refusal'."
                        )))
                    }
                };
                let text = part.get(key).and_then(Value::as_str).ok_or_else(|| {
                    bad_message(format!("messages[{i}].content[{j}] has no string '{key}'."))
                })?;
                if !text.is_empty() {
                    blocks.push(text_block(text.to_string()));
                }
            }
        }
        other => {
            return Err(bad_message(format!(
                "messages[{i}].content must be a string, an array of content parts or null, \
                 not {}.",
                json_type(other)
            )))
        }
    }
    match msg.get("tool_calls").unwrap_or(&Value::Null) {
        Value::Null => {}
        Value::Array(calls) => {
            for (j, call) in calls.iter().enumerate() {
                let (id, name, input) = tool_call(call, i, j, provider)?;
                blocks.push(tool_block(id, name, input));
            }
        }
        other => {
            return Err(bad_message(format!(
                "messages[{i}].tool_calls must be an array, not {}.",
                json_type(other)
            )))
        }
    }
    Ok(blocks)
}

/// One assistant tool call: its id, function name, and arguments parsed
/// into a JSON object (targets that take structured input need one).
fn tool_call<'a>(
    call: &'a Value,
    i: usize,
    j: usize,
    provider: &str,
) -> Result<(&'a str, &'a str, Value), ApiError> {
    let id = call
        .get("id")
        .and_then(Value::as_str)
        .ok_or_else(|| bad_message(format!("messages[{i}].tool_calls[{j}] has no string 'id'.")))?;
    let function = call.get("function");
    let name = function
        .and_then(|f| f.get("name"))
        .and_then(Value::as_str)
        .ok_or_else(|| {
            bad_message(format!(
                "messages[{i}].tool_calls[{j}] has no string 'function.name'."
            ))
        })?;
    let input = match function.and_then(|f| f.get("arguments")) {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(Value::String(s)) if s.trim().is_empty() => Value::Object(Map::new()),
        Some(Value::String(s)) => serde_json::from_str(s).map_err(|e| {
            bad_message(format!(
                "messages[{i}].tool_calls[{j}].function.arguments is not valid JSON ({e}); \
                 the {provider} provider needs the arguments as a JSON object."
            ))
        })?,
        Some(other) => other.clone(),
    };
    if !input.is_object() {
        return Err(bad_message(format!(
            "messages[{i}].tool_calls[{j}].function.arguments must encode a JSON object, \
             not {}.",
            json_type(&input)
        )));
    }
    Ok((id, name, input))
}
