//! The pivot request (OpenAI Chat Completions) read once into a typed
//! [`ChatRequest`] for the provider-side translators (`outbound/`).
//!
//! Everything every provider reads the same way is checked here, with
//! OpenAI's own error shapes: `messages` an array, `n`, `response_format`,
//! the token limit, `reasoning_effort`, `temperature`, `top_p`, `stop`,
//! `stream`, `tools` and `tool_choice`. What a provider cannot do with a
//! valid value (`n` > 1, JSON mode, ...) is that provider's to refuse, and
//! parameters only one provider reads (`seed`, `user`, penalties) are read
//! there through [`ChatRequest::optional`] and [`ChatRequest::number`], so a
//! provider that drops them never rejects them.

use serde_json::{Map, Value};

use crate::core::api_error::ApiError;
use crate::translate::chat_input::{bad_message, invalid_type, invalid_value, json_type};

/// `reasoning_effort`, one of the values OpenAI accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasoningEffort {
    None,
    Minimal,
    Low,
    Medium,
    High,
}

impl ReasoningEffort {
    pub fn name(self) -> &'static str {
        match self {
            ReasoningEffort::None => "none",
            ReasoningEffort::Minimal => "minimal",
            ReasoningEffort::Low => "low",
            ReasoningEffort::Medium => "medium",
            ReasoningEffort::High => "high",
        }
    }
}

/// `response_format`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ResponseFormat<'a> {
    Text,
    JsonObject,
    /// The whole `response_format` object (`json_schema.schema` in it is
    /// not checked: only a provider that sends it reads it).
    JsonSchema(&'a Value),
}

impl ResponseFormat<'_> {
    /// The `type` the caller gave.
    pub fn kind(&self) -> &'static str {
        match self {
            ResponseFormat::Text => "text",
            ResponseFormat::JsonObject => "json_object",
            ResponseFormat::JsonSchema(_) => "json_schema",
        }
    }
}

/// One entry of `tools` (only function tools are accepted).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tool<'a> {
    pub name: &'a str,
    pub description: Option<&'a str>,
    /// The JSON Schema object; None when absent or null.
    pub parameters: Option<&'a Value>,
}

/// `tool_choice`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolChoice<'a> {
    Auto,
    None,
    Required,
    /// `{"type":"function","function":{"name":...}}`.
    Named(&'a str),
}

impl ToolChoice<'_> {
    /// The model must call a tool.
    pub fn forces_a_call(&self) -> bool {
        matches!(self, ToolChoice::Required | ToolChoice::Named(_))
    }
}

/// Who speaks a message (`system` and `developer` are one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role<'a> {
    System,
    User,
    Assistant,
    Tool,
    /// A role no provider takes; the provider names itself in the error.
    Other(&'a str),
}

/// One entry of `messages`, its role read.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    /// Its place in `messages`, for error messages.
    pub index: usize,
    pub role: Role<'a>,
    pub fields: &'a Map<String, Value>,
}

impl<'a> Message<'a> {
    /// `content`, null when absent.
    pub fn content(&self) -> &'a Value {
        self.fields.get("content").unwrap_or(&Value::Null)
    }

    /// A tool message's `tool_call_id`.
    pub fn tool_call_id(&self) -> Result<&'a str, ApiError> {
        self.fields
            .get("tool_call_id")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                bad_message(format!(
                    "messages[{}] has no string 'tool_call_id'.",
                    self.index
                ))
            })
    }

    /// An assistant message's texts, empty ones dropped: `content` as a
    /// string, or its `text` and `refusal` parts.
    pub fn assistant_texts(&self) -> Result<Vec<&'a str>, ApiError> {
        let i = self.index;
        match self.content() {
            Value::Null => Ok(Vec::new()),
            Value::String(s) => Ok([s.as_str()].into_iter().filter(|s| !s.is_empty()).collect()),
            Value::Array(parts) => {
                let mut texts = Vec::new();
                for (j, part) in parts.iter().enumerate() {
                    let kind = part.get("type").and_then(Value::as_str).unwrap_or_default();
                    let key = match kind {
                        "text" => "text",
                        "refusal" => "refusal",
                        _ => {
                            return Err(bad_message(format!(
                                "messages[{i}].content[{j}]: assistant content parts must be \
                                 of type 'text' or 'refusal'."
                            )))
                        }
                    };
                    let text = part.get(key).and_then(Value::as_str).ok_or_else(|| {
                        bad_message(format!("messages[{i}].content[{j}] has no string '{key}'."))
                    })?;
                    if !text.is_empty() {
                        texts.push(text);
                    }
                }
                Ok(texts)
            }
            other => Err(bad_message(format!(
                "messages[{i}].content must be a string, an array of content parts or null, \
                 not {}.",
                json_type(other)
            ))),
        }
    }

    /// An assistant message's tool calls, arguments parsed into objects.
    /// `provider` names the target in error messages; with `need_id` a
    /// call without a string `id` is refused.
    pub fn tool_calls(
        &self,
        provider: &str,
        need_id: bool,
    ) -> Result<Vec<HistoryCall<'a>>, ApiError> {
        let i = self.index;
        match self.fields.get("tool_calls").unwrap_or(&Value::Null) {
            Value::Null => Ok(Vec::new()),
            Value::Array(calls) => calls
                .iter()
                .enumerate()
                .map(|(j, call)| history_call(call, i, j, provider, need_id))
                .collect(),
            other => Err(bad_message(format!(
                "messages[{i}].tool_calls must be an array, not {}.",
                json_type(other)
            ))),
        }
    }

    /// An assistant message as the target's blocks: text first, then one
    /// block per tool call (ids required), made by `text_block` and
    /// `tool_block(id, name, input)`.
    pub fn assistant_blocks(
        &self,
        provider: &str,
        text_block: fn(String) -> Value,
        tool_block: fn(&str, &str, Value) -> Value,
    ) -> Result<Vec<Value>, ApiError> {
        let mut blocks: Vec<Value> = self
            .assistant_texts()?
            .into_iter()
            .map(|text| text_block(text.to_string()))
            .collect();
        for call in self.tool_calls(provider, true)? {
            blocks.push(tool_block(
                call.id.unwrap_or_default(),
                call.name,
                call.arguments,
            ));
        }
        Ok(blocks)
    }

    /// The "role not supported" error, naming `provider`.
    pub fn unsupported_role(&self, role: &str, provider: &str) -> ApiError {
        bad_message(format!(
            "messages[{}]: the role '{role}' is not supported by the {provider} provider \
             through this gateway; use system, developer, user, assistant or tool.",
            self.index
        ))
    }
}

/// One tool call of an assistant message in the history.
#[derive(Debug)]
pub struct HistoryCall<'a> {
    pub id: Option<&'a str>,
    pub name: &'a str,
    /// The arguments as a JSON object (targets that take structured input
    /// need one).
    pub arguments: Value,
    /// The call as given, for provider data in it (Gemini's signatures).
    pub raw: &'a Value,
}

fn history_call<'a>(
    call: &'a Value,
    i: usize,
    j: usize,
    provider: &str,
    need_id: bool,
) -> Result<HistoryCall<'a>, ApiError> {
    let id = call.get("id").and_then(Value::as_str);
    if need_id && id.is_none() {
        return Err(bad_message(format!(
            "messages[{i}].tool_calls[{j}] has no string 'id'."
        )));
    }
    let function = call.get("function");
    let name = function
        .and_then(|f| f.get("name"))
        .and_then(Value::as_str)
        .ok_or_else(|| {
            bad_message(format!(
                "messages[{i}].tool_calls[{j}] has no string 'function.name'."
            ))
        })?;
    let arguments = match function.and_then(|f| f.get("arguments")) {
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
    if !arguments.is_object() {
        return Err(bad_message(format!(
            "messages[{i}].tool_calls[{j}].function.arguments must encode a JSON object, \
             not {}.",
            json_type(&arguments)
        )));
    }
    Ok(HistoryCall {
        id,
        name,
        arguments,
        raw: call,
    })
}

/// The pivot request with every shared parameter checked and typed.
#[derive(Debug)]
pub struct ChatRequest<'a> {
    raw: &'a Map<String, Value>,
    messages: &'a [Value],
    /// `n`, at least 1.
    pub n: Option<u64>,
    pub response_format: Option<ResponseFormat<'a>>,
    /// `max_completion_tokens`, else `max_tokens`; at least 1.
    pub max_tokens: Option<u64>,
    pub reasoning_effort: Option<ReasoningEffort>,
    /// Numbers, as given.
    pub temperature: Option<&'a Value>,
    pub top_p: Option<&'a Value>,
    pub stop: Vec<&'a str>,
    pub stream: bool,
    /// `stream_options.include_usage` as given (whether or not streamed).
    pub include_usage: bool,
    pub tools: Vec<Tool<'a>>,
    /// None when absent, or when there are no tools and it forces no call
    /// ("auto" or "none" without tools mean no tool use).
    pub tool_choice: Option<ToolChoice<'a>>,
    /// `parallel_tool_calls`, when a boolean.
    pub parallel_tool_calls: Option<bool>,
}

impl<'a> ChatRequest<'a> {
    /// Reads `req` (the pivot body as a JSON object); the first shared
    /// parameter that is wrong is the error.
    pub fn parse(req: &'a Map<String, Value>) -> Result<Self, ApiError> {
        let mut chat = ChatRequest {
            raw: req,
            messages: &[],
            n: None,
            response_format: None,
            max_tokens: None,
            reasoning_effort: None,
            temperature: None,
            top_p: None,
            stop: Vec::new(),
            stream: false,
            include_usage: false,
            tools: Vec::new(),
            tool_choice: None,
            parallel_tool_calls: None,
        };
        chat.n = chat.optional("n").map(parse_n).transpose()?;
        chat.response_format = chat
            .optional("response_format")
            .map(parse_response_format)
            .transpose()?;
        chat.messages = match req.get("messages") {
            Some(Value::Array(m)) => m,
            None | Some(Value::Null) => {
                return Err(ApiError::invalid_request(
                    Some("missing_required_parameter"),
                    "Missing required parameter: 'messages'.".into(),
                )
                .with_param("messages"))
            }
            Some(other) => return Err(invalid_type("messages", "an array", other)),
        };
        chat.max_tokens = chat.token_limit()?;
        chat.reasoning_effort = chat
            .optional("reasoning_effort")
            .map(parse_reasoning_effort)
            .transpose()?;
        chat.temperature = chat.number("temperature")?;
        chat.top_p = chat.number("top_p")?;
        chat.stop = chat
            .optional("stop")
            .map(parse_stop)
            .transpose()?
            .unwrap_or_default();
        chat.stream = match chat.optional("stream") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => return Err(invalid_type("stream", "a boolean", other)),
        };
        chat.include_usage = chat
            .optional("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        chat.tools = match chat.optional("tools") {
            None => Vec::new(),
            Some(Value::Array(tools)) => tools
                .iter()
                .enumerate()
                .map(|(i, t)| parse_tool(t, i))
                .collect::<Result<Vec<_>, _>>()?,
            Some(other) => return Err(invalid_type("tools", "an array", other)),
        };
        let choice = chat
            .optional("tool_choice")
            .map(parse_tool_choice)
            .transpose()?;
        chat.tool_choice = match choice {
            Some(c) if chat.tools.is_empty() && c.forces_a_call() => {
                return Err(invalid_value(
                    "tool_choice",
                    "'tool_choice' requires a tool, but 'tools' is empty.".into(),
                ))
            }
            _ if chat.tools.is_empty() => None,
            c => c,
        };
        chat.parallel_tool_calls = chat
            .optional("parallel_tool_calls")
            .and_then(Value::as_bool);
        Ok(chat)
    }

    /// An optional parameter: OpenAI treats an explicit null like an absent
    /// one.
    pub fn optional(&self, name: &str) -> Option<&'a Value> {
        self.raw.get(name).filter(|v| !v.is_null())
    }

    /// An optional parameter that must be a number.
    pub fn number(&self, name: &'static str) -> Result<Option<&'a Value>, ApiError> {
        match self.optional(name) {
            None => Ok(None),
            Some(v @ Value::Number(_)) => Ok(Some(v)),
            Some(other) => Err(invalid_type(name, "a number", other)),
        }
    }

    /// `messages`, each read as it is reached, so that the first wrong one
    /// is the error.
    pub fn messages(&self) -> impl Iterator<Item = Result<Message<'a>, ApiError>> + 'a {
        self.messages.iter().enumerate().map(|(i, message)| {
            let Some(fields) = message.as_object() else {
                return Err(bad_message(format!(
                    "messages[{i}] must be an object, not {}.",
                    json_type(message)
                )));
            };
            let role = fields
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| bad_message(format!("messages[{i}] has no string 'role'.")))?;
            let role = match role {
                "system" | "developer" => Role::System,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                "tool" => Role::Tool,
                other => Role::Other(other),
            };
            Ok(Message {
                index: i,
                role,
                fields,
            })
        })
    }

    /// `max_completion_tokens`, else `max_tokens`.
    fn token_limit(&self) -> Result<Option<u64>, ApiError> {
        let (param, tokens) = match (
            self.optional("max_completion_tokens"),
            self.optional("max_tokens"),
        ) {
            (Some(v), _) => ("max_completion_tokens", Some(v)),
            (None, v) => ("max_tokens", v),
        };
        let Some(v) = tokens else { return Ok(None) };
        match v.as_u64() {
            Some(0) => Err(invalid_value(
                param,
                format!("'{param}' must be at least 1."),
            )),
            Some(n) => Ok(Some(n)),
            None => Err(invalid_type(param, "a positive integer", v)),
        }
    }
}

fn parse_n(n: &Value) -> Result<u64, ApiError> {
    match n.as_u64() {
        Some(0) => Err(invalid_value("n", "'n' must be at least 1.".into())),
        Some(n) => Ok(n),
        None => Err(invalid_type("n", "an integer", n)),
    }
}

fn parse_response_format(format: &Value) -> Result<ResponseFormat<'_>, ApiError> {
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(ResponseFormat::Text),
        Some("json_object") => Ok(ResponseFormat::JsonObject),
        Some("json_schema") => Ok(ResponseFormat::JsonSchema(format)),
        _ => Err(invalid_value(
            "response_format",
            "'response_format' must be an object with 'type' 'text', 'json_object' or \
             'json_schema'."
                .into(),
        )),
    }
}

fn parse_reasoning_effort(effort: &Value) -> Result<ReasoningEffort, ApiError> {
    let Value::String(effort) = effort else {
        return Err(invalid_type("reasoning_effort", "a string", effort));
    };
    match effort.as_str() {
        "none" => Ok(ReasoningEffort::None),
        "minimal" => Ok(ReasoningEffort::Minimal),
        "low" => Ok(ReasoningEffort::Low),
        "medium" => Ok(ReasoningEffort::Medium),
        "high" => Ok(ReasoningEffort::High),
        other => Err(invalid_value(
            "reasoning_effort",
            format!(
                "Invalid 'reasoning_effort' value '{other}': use 'none', 'minimal', 'low', \
                 'medium' or 'high'."
            ),
        )),
    }
}

fn parse_stop(stop: &Value) -> Result<Vec<&str>, ApiError> {
    let want = "a string or an array of strings";
    match stop {
        Value::String(s) => Ok(vec![s.as_str()]),
        Value::Array(items) => items
            .iter()
            .map(|s| s.as_str().ok_or_else(|| invalid_type("stop", want, s)))
            .collect(),
        other => Err(invalid_type("stop", want, other)),
    }
}

fn parse_tool(tool: &Value, i: usize) -> Result<Tool<'_>, ApiError> {
    let bad = |what: &str| invalid_value("tools", format!("tools[{i}] {what}."));
    if tool.get("type").and_then(Value::as_str) != Some("function") {
        return Err(bad("must be of type 'function'"));
    }
    let function = tool
        .get("function")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("has no 'function' object"))?;
    let name = function
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("has no string 'function.name'"))?;
    let description = match function.get("description") {
        None | Some(Value::Null) => None,
        Some(Value::String(d)) => Some(d.as_str()),
        Some(_) => return Err(bad("has a 'function.description' that is not a string")),
    };
    let parameters = match function.get("parameters") {
        None | Some(Value::Null) => None,
        Some(p @ Value::Object(_)) => Some(p),
        Some(_) => return Err(bad("has 'function.parameters' that is not an object")),
    };
    Ok(Tool {
        name,
        description,
        parameters,
    })
}

fn parse_tool_choice(choice: &Value) -> Result<ToolChoice<'_>, ApiError> {
    match choice {
        Value::String(s) => match s.as_str() {
            "auto" => Ok(ToolChoice::Auto),
            "none" => Ok(ToolChoice::None),
            "required" => Ok(ToolChoice::Required),
            other => Err(invalid_value(
                "tool_choice",
                format!(
                    "Invalid 'tool_choice' value '{other}': use 'auto', 'none', 'required' or \
                     a function object."
                ),
            )),
        },
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => o
            .get("function")
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .map(ToolChoice::Named)
            .ok_or_else(|| {
                invalid_value(
                    "tool_choice",
                    "'tool_choice' has no string 'function.name'.".into(),
                )
            }),
        _ => Err(invalid_value(
            "tool_choice",
            "'tool_choice' must be 'auto', 'none', 'required' or \
             {\"type\":\"function\",\"function\":{\"name\":...}}."
                .into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<(), ApiError> {
        let req = crate::translate::request_object(body.as_bytes())?;
        ChatRequest::parse(&req).map(|_| ())
    }

    #[test]
    fn reads_the_shared_parameters() {
        let req = crate::translate::request_object(
            br#"{"messages":[{"role":"developer","content":"x"},{"role":"critic"}],
            "n":1,"max_tokens":5,"max_completion_tokens":7,"reasoning_effort":"low",
            "temperature":0.5,"top_p":null,"stop":"END","stream":true,
            "stream_options":{"include_usage":true},"tool_choice":"none",
            "tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}],
            "parallel_tool_calls":false,"seed":"x"}"#,
        )
        .unwrap();
        let chat = ChatRequest::parse(&req).unwrap();
        assert_eq!(chat.n, Some(1));
        assert_eq!(chat.max_tokens, Some(7));
        assert_eq!(chat.reasoning_effort, Some(ReasoningEffort::Low));
        assert_eq!(chat.temperature, Some(&serde_json::json!(0.5)));
        assert_eq!(chat.top_p, None);
        assert_eq!(chat.stop, vec!["END"]);
        assert!(chat.stream && chat.include_usage);
        assert_eq!(chat.tools.len(), 1);
        assert_eq!(chat.tools[0].name, "f");
        assert_eq!(chat.tool_choice, Some(ToolChoice::None));
        assert_eq!(chat.parallel_tool_calls, Some(false));
        // Only the provider that reads `seed` checks it.
        assert_eq!(chat.optional("seed"), Some(&serde_json::json!("x")));
        let roles: Vec<Role> = chat.messages().map(|m| m.unwrap().role).collect();
        assert_eq!(roles, vec![Role::System, Role::Other("critic")]);
    }

    #[test]
    fn refuses_wrong_shared_parameters_in_openai_shape() {
        let cases = [
            (r#"{}"#, "messages", "missing_required_parameter"),
            (r#"{"messages":{}}"#, "messages", "invalid_type"),
            (r#"{"messages":[],"n":0}"#, "n", "invalid_value"),
            (
                r#"{"messages":[],"max_tokens":0}"#,
                "max_tokens",
                "invalid_value",
            ),
            (
                r#"{"messages":[],"max_completion_tokens":-1}"#,
                "max_completion_tokens",
                "invalid_type",
            ),
            (
                r#"{"messages":[],"response_format":{"type":"xml"}}"#,
                "response_format",
                "invalid_value",
            ),
            (
                r#"{"messages":[],"reasoning_effort":"max"}"#,
                "reasoning_effort",
                "invalid_value",
            ),
            (
                r#"{"messages":[],"temperature":"hot"}"#,
                "temperature",
                "invalid_type",
            ),
            (r#"{"messages":[],"stop":[1]}"#, "stop", "invalid_type"),
            (
                r#"{"messages":[],"stream":"yes"}"#,
                "stream",
                "invalid_type",
            ),
            (
                r#"{"messages":[],"tools":[{"type":"x"}]}"#,
                "tools",
                "invalid_value",
            ),
            (
                r#"{"messages":[],"tool_choice":"required"}"#,
                "tool_choice",
                "invalid_value",
            ),
        ];
        for (body, param, code) in cases {
            let error = parse(body).unwrap_err();
            assert_eq!(error.status, 400, "{body}");
            assert_eq!(error.param, Some(param), "{body}");
            assert_eq!(error.code, Some(code), "{body}");
        }
    }
}
