//! The OpenAI chat completion shapes the provider translators write: the
//! answer side of the pivot. One definition, so every provider's answers
//! serialize the same way.

use serde::Serialize;
use serde_json::Value;

#[derive(Serialize)]
pub struct ChatUsage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub prompt_tokens_details: CachedTokens,
    /// Only providers that count reasoning tokens apart report this.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_tokens_details: Option<ReasoningTokens>,
}

#[derive(Serialize)]
pub struct CachedTokens {
    pub cached_tokens: u64,
}

#[derive(Serialize)]
pub struct ReasoningTokens {
    pub reasoning_tokens: u64,
}

/// A `chat.completion` with one choice (providers that answer one message).
#[derive(Serialize)]
pub struct ChatCompletion<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: [Choice<'a>; 1],
    pub usage: ChatUsage,
}

#[derive(Serialize)]
pub struct Choice<'a> {
    pub index: u32,
    pub message: ChatMessage<'a>,
    pub logprobs: (),
    pub finish_reason: &'static str,
}

#[derive(Serialize)]
pub struct ChatMessage<'a> {
    pub role: &'static str,
    pub content: Option<String>,
    pub refusal: (),
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
}

#[derive(Serialize)]
pub struct ToolCall<'a> {
    pub id: &'a str,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionCall<'a>,
}

#[derive(Serialize)]
pub struct FunctionCall<'a> {
    pub name: &'a str,
    pub arguments: String,
}

/// One `chat.completion.chunk` event.
#[derive(Serialize)]
pub struct Chunk<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: &'a [ChunkChoice<'a>],
    /// Absent without include_usage; null on content chunks; set on the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<ChatUsage>>,
}

#[derive(Serialize)]
pub struct ChunkChoice<'a> {
    pub index: u64,
    pub delta: Delta<'a>,
    pub logprobs: (),
    pub finish_reason: Option<&'static str>,
}

#[derive(Serialize, Default)]
pub struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refusal: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<[ToolCallDelta<'a>; 1]>,
}

#[derive(Serialize)]
pub struct ToolCallDelta<'a> {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<&'a str>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: FunctionDelta<'a>,
    /// Provider data a caller must send back (Gemini's thought signatures).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extra_content: Option<Value>,
}

#[derive(Serialize)]
pub struct FunctionDelta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<&'a str>,
    pub arguments: &'a str,
}

/// Appends one `data:` event.
pub fn write_data(out: &mut Vec<u8>, json: &[u8]) {
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(json);
    out.extend_from_slice(b"\n\n");
}

/// What every chunk of one pivot stream repeats, and how it is written.
pub struct PivotChunks {
    pub id: String,
    pub model: String,
    pub created: u64,
    /// The caller asked for usage: content chunks carry `usage: null`, and
    /// a last chunk the counts.
    pub include_usage: bool,
}

impl PivotChunks {
    pub fn new(include_usage: bool, model: &str, created: u64) -> Self {
        PivotChunks {
            id: String::new(),
            model: model.to_string(),
            created,
            include_usage,
        }
    }

    /// One chunk of `choices`.
    pub fn write(
        &self,
        out: &mut Vec<u8>,
        choices: &[ChunkChoice<'_>],
        usage: Option<Option<ChatUsage>>,
    ) {
        let chunk = Chunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices,
            usage,
        };
        match serde_json::to_vec(&chunk) {
            Ok(json) => write_data(out, &json),
            Err(e) => log::error!("could not serialize a chat.completion.chunk: {e}"),
        }
    }

    /// One chunk of one choice's `delta`.
    pub fn delta(
        &self,
        out: &mut Vec<u8>,
        index: u64,
        delta: Delta<'_>,
        finish: Option<&'static str>,
    ) {
        let choices = [ChunkChoice {
            index,
            delta,
            logprobs: (),
            finish_reason: finish,
        }];
        self.write(out, &choices, self.include_usage.then_some(None));
    }

    /// The complete stream's end: the usage chunk when asked for, `[DONE]`.
    pub fn end(&self, out: &mut Vec<u8>, usage: ChatUsage) {
        if self.include_usage {
            self.write(out, &[], Some(Some(usage)));
        }
        out.extend_from_slice(b"data: [DONE]\n\n");
    }
}
