//! The caller mistakes every request translator reports the same way, in
//! OpenAI's error shape (`param` names the field, `code` says what is wrong).

use serde_json::Value;

use crate::api::openai::ApiError;

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
