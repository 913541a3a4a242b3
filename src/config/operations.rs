//! The operations a caller's URL names: the LLM calls the gateway
//! translates (chat, in every caller API, and embeddings), the other
//! OpenAI and Anthropic endpoints that name a model and pass to their
//! target as they are, and the calls on a provider account's stored
//! objects, which name no model.

use crate::core::schema::Schema;

/// Which inbound API operation a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    ChatCompletions,
    Embeddings,
    /// An endpoint that names a model, sent to the chosen target as it is
    /// (only `model` rewritten).
    Passed(Passed),
    /// A call on the account's stored objects, sent to the configured
    /// account provider (`default_provider`).
    Account(Account),
}

/// Endpoints passed through to targets that serve them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Passed {
    Completions,
    ImageGenerations,
    ImageEdits,
    ImageVariations,
    Transcriptions,
    Translations,
    Speech,
    Moderations,
    /// Anthropic's `POST /v1/messages/count_tokens`.
    CountTokens,
}

/// Calls on stored objects: no model to route by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Account {
    Files,
    Batches,
    /// `GET`/`DELETE /v1/responses/{id}` and its `cancel` and `input_items`.
    StoredResponses,
}

impl Passed {
    pub const ALL: [Passed; 9] = [
        Passed::Completions,
        Passed::ImageGenerations,
        Passed::ImageEdits,
        Passed::ImageVariations,
        Passed::Transcriptions,
        Passed::Translations,
        Passed::Speech,
        Passed::Moderations,
        Passed::CountTokens,
    ];

    /// The caller's path (and the provider's, after its base path).
    pub fn path(self) -> &'static str {
        match self {
            Passed::Completions => "/v1/completions",
            Passed::ImageGenerations => "/v1/images/generations",
            Passed::ImageEdits => "/v1/images/edits",
            Passed::ImageVariations => "/v1/images/variations",
            Passed::Transcriptions => "/v1/audio/transcriptions",
            Passed::Translations => "/v1/audio/translations",
            Passed::Speech => "/v1/audio/speech",
            Passed::Moderations => "/v1/moderations",
            Passed::CountTokens => "/v1/messages/count_tokens",
        }
    }

    pub fn from_path(path: &str) -> Option<Passed> {
        Passed::ALL.into_iter().find(|p| p.path() == path)
    }

    /// The body is `multipart/form-data` (an uploaded file and fields).
    pub fn is_form(self) -> bool {
        matches!(
            self,
            Passed::ImageEdits
                | Passed::ImageVariations
                | Passed::Transcriptions
                | Passed::Translations
        )
    }

    pub fn caller(self) -> Schema {
        match self {
            Passed::CountTokens => Schema::Anthropic,
            _ => Schema::OpenAi,
        }
    }

    /// The field every request of this endpoint carries.
    pub fn required_field(self) -> &'static str {
        match self {
            Passed::Completions | Passed::ImageGenerations | Passed::ImageEdits => "prompt",
            Passed::Speech | Passed::Moderations => "input",
            Passed::CountTokens => "messages",
            // A variation's upload is its `image`; audio's is its `file`.
            Passed::ImageVariations => "image",
            Passed::Transcriptions | Passed::Translations => "file",
        }
    }

    /// The model OpenAI uses when a request names none, which the gateway
    /// then routes by; None where the model is required.
    pub fn default_model(self) -> Option<&'static str> {
        match self {
            Passed::Moderations => Some("omni-moderation-latest"),
            Passed::ImageGenerations | Passed::ImageEdits | Passed::ImageVariations => {
                Some("dall-e-2")
            }
            _ => None,
        }
    }

    /// What the endpoint is, for errors ("has no {what}").
    pub fn describe(self) -> &'static str {
        match self {
            Passed::Completions => "completions API",
            Passed::ImageGenerations => "image generation API",
            Passed::ImageEdits => "image edit API",
            Passed::ImageVariations => "image variation API",
            Passed::Transcriptions => "transcription API",
            Passed::Translations => "audio translation API",
            Passed::Speech => "speech API",
            Passed::Moderations => "moderation API",
            Passed::CountTokens => "token counting API",
        }
    }
}

impl Account {
    /// The endpoint for a caller's path, if it is one of these.
    pub fn of_path(path: &str) -> Option<Account> {
        let under = |prefix: &str| {
            path.strip_prefix(prefix)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        };
        if under("/v1/files") {
            Some(Account::Files)
        } else if under("/v1/batches") {
            Some(Account::Batches)
        } else if path
            .strip_prefix("/v1/responses/")
            .is_some_and(|rest| !rest.is_empty())
        {
            Some(Account::StoredResponses)
        } else {
            None
        }
    }
}

impl Operation {
    /// Every operation a chain may carry, in a fixed order: the handoff's
    /// encoding is the index here.
    pub fn chained() -> impl Iterator<Item = Operation> {
        [Operation::ChatCompletions, Operation::Embeddings]
            .into_iter()
            .chain(Passed::ALL.into_iter().map(Operation::Passed))
    }

    pub fn code(self) -> usize {
        Operation::chained().position(|o| o == self).unwrap_or(0)
    }

    pub fn from_code(code: usize) -> Option<Operation> {
        Operation::chained().nth(code)
    }

    /// OpenTelemetry's `gen_ai.operation.name` where it has one, else a
    /// name of the same style.
    pub fn name(self) -> &'static str {
        match self {
            Operation::ChatCompletions => "chat",
            Operation::Embeddings => "embeddings",
            Operation::Passed(p) => match p {
                Passed::Completions => "text_completion",
                Passed::ImageGenerations => "image_generation",
                Passed::ImageEdits => "image_edit",
                Passed::ImageVariations => "image_variation",
                Passed::Transcriptions => "transcription",
                Passed::Translations => "audio_translation",
                Passed::Speech => "speech",
                Passed::Moderations => "moderation",
                Passed::CountTokens => "count_tokens",
            },
            Operation::Account(a) => match a {
                Account::Files => "files",
                Account::Batches => "batches",
                Account::StoredResponses => "stored_responses",
            },
        }
    }

    /// Bodies are taken as they are: no translation between APIs.
    pub fn passes_body(self) -> bool {
        !matches!(self, Operation::ChatCompletions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_paths_are_recognised() {
        for op in Operation::chained() {
            assert_eq!(Operation::from_code(op.code()), Some(op));
        }
        assert_eq!(Operation::from_code(99), None);
        for p in Passed::ALL {
            assert_eq!(Passed::from_path(p.path()), Some(p));
        }
        assert_eq!(Account::of_path("/v1/files"), Some(Account::Files));
        assert_eq!(
            Account::of_path("/v1/files/file-1/content"),
            Some(Account::Files)
        );
        assert_eq!(Account::of_path("/v1/filesx"), None);
        assert_eq!(
            Account::of_path("/v1/batches/b/cancel"),
            Some(Account::Batches)
        );
        assert_eq!(
            Account::of_path("/v1/responses/resp_1"),
            Some(Account::StoredResponses)
        );
        assert_eq!(Account::of_path("/v1/responses"), None);
        assert_eq!(Account::of_path("/v1/responses/"), None);
    }
}
