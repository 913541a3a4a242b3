//! Reading what the translators take in, shared by all of them: OpenAI chat
//! request parts (message text, assistant turns), the caller mistakes they
//! report the same way in OpenAI's error shape (`param` names the field,
//! `code` says what is wrong), and the quoting of provider error bodies.

use serde_json::Value;

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
