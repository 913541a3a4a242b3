//! The request as both halves read it: the body, buffered whole (a half
//! says what the complete body starts), its JSON top level, and the call
//! it makes (`model`, `stream`), with the caller's errors about them.

use super::flow::internal;
use super::flow::Flow;
use super::state::{Call, Phase};
use crate::config::models::{Operation, Passed};
use crate::config::Config;
use crate::core::api_error::ApiError;
use crate::core::json::{Kind, TopLevel};
use crate::core::multipart;
use crate::core::schema::Schema;
use crate::host::Host;

/// A call that came without a body: the caller's 400.
pub(super) fn missing_body() -> ApiError {
    ApiError::invalid_request(
        Some("missing_body"),
        "The request has no body; send a JSON object.".into(),
    )
}

/// A half that buffers the request body whole. Both halves do, the same
/// way; they differ in what the complete body starts.
pub(super) trait ReadsBody {
    fn phase(&self) -> Phase;
    fn config(&self) -> &Config;
    /// Answers the request with `error`, in the caller's shape.
    fn refuse(&mut self, host: &mut dyn Host, error: ApiError) -> Flow;
    /// The whole body is buffered.
    fn body_complete(&mut self, host: &mut dyn Host, body_size: usize) -> Flow;
}

/// A body chunk: keep buffering, refuse past the limit, or go on with the
/// complete body.
pub(super) fn body_chunk(
    half: &mut dyn ReadsBody,
    host: &mut dyn Host,
    body_size: usize,
    end_of_stream: bool,
) -> Flow {
    if half.phase() != Phase::ReadingBody {
        return Flow::Continue;
    }
    let limit = half.config().max_request_bytes;
    if body_size > limit {
        let error = ApiError::new(
            413,
            "invalid_request_error",
            Some("request_too_large"),
            format!("The request body is larger than this gateway's limit of {limit} bytes."),
        );
        return half.refuse(host, error);
    }
    if !end_of_stream {
        return Flow::Pause;
    }
    half.body_complete(host, body_size)
}

/// Trailers end a request whose last body chunk was not marked final.
pub(super) fn body_trailers(
    half: &mut dyn ReadsBody,
    host: &mut dyn Host,
    body_size: usize,
) -> Flow {
    if half.phase() != Phase::ReadingBody {
        return Flow::Continue;
    }
    half.body_complete(host, body_size)
}

/// The request body's top level, or the caller's 400.
pub(super) fn parse_body(body: &[u8], op: Operation) -> Result<TopLevel<'_>, ApiError> {
    // A form upload has no JSON top level; `read_call` reads its fields.
    if let Operation::Passed(p) = op {
        if p.is_form() {
            return TopLevel::parse(b"{}").map_err(|e| internal(format!("{e}")));
        }
    }
    TopLevel::parse(body).map_err(|e| {
        ApiError::invalid_request(
            Some("invalid_json"),
            format!("The request body is not a valid JSON object: {e}."),
        )
    })
}

/// The model and streaming choice of a call, from its body (or the URL, for
/// Gemini callers), with the required field checked.
pub(super) fn read_call(
    (body, doc): (&[u8], &TopLevel),
    op: Operation,
    caller: Schema,
    gemini_call: Option<&(String, bool)>,
) -> Result<Call, ApiError> {
    if let Some((model, stream)) = gemini_call {
        return Ok(Call {
            model: model.clone(),
            model_span: None,
            stream: *stream,
        });
    }
    if let Operation::Passed(p) = op {
        if p.is_form() {
            return read_form_call(body, p);
        }
    }
    let field = |name: &'static str| {
        doc.get(name).map_err(|_| {
            ApiError::invalid_request(
                Some("duplicate_parameter"),
                format!("The parameter '{name}' is given more than once."),
            )
            .with_param(name)
        })
    };
    let default_model = match op {
        Operation::Passed(p) => p.default_model(),
        _ => None,
    };
    let (model, model_span) = match (field("model")?, default_model) {
        (Some(f), _) => {
            let model = doc
                .str_value(f)
                .ok_or_else(|| invalid_type("model", "a string", f.kind))?
                .into_owned();
            (model, Some(f.value.clone()))
        }
        // Routed as OpenAI would serve it: by its default model.
        (None, Some(name)) => (name.to_string(), None),
        (None, None) => return Err(missing_model()),
    };
    let (required, want) = match (op, caller) {
        // A string or items: the translator checks which.
        (Operation::ChatCompletions, Schema::Responses) => ("input", None),
        (Operation::ChatCompletions, _) => ("messages", Some(Kind::Array)),
        (Operation::Embeddings, _) => ("input", None),
        (Operation::Passed(p), _) => (p.required_field(), None),
        (Operation::Account(_), _) => {
            return Err(internal("a stored-object call has no model".into()))
        }
    };
    let required_field = field(required)?.ok_or_else(|| {
        ApiError::invalid_request(
            Some("missing_required_parameter"),
            format!("Missing required parameter: '{required}'."),
        )
        .with_param(required)
    })?;
    if let Some(kind) = want {
        if required_field.kind != kind {
            return Err(invalid_type(required, kind.name(), required_field.kind));
        }
    }
    // Only completions stream tokens among the passed endpoints.
    let streams = matches!(
        op,
        Operation::ChatCompletions | Operation::Passed(Passed::Completions)
    );
    let stream = match field("stream")?.filter(|_| streams) {
        None => false,
        Some(s) => match s.kind {
            Kind::Bool => doc.bool_value(s).unwrap_or(false),
            Kind::Null => false,
            other => return Err(invalid_type("stream", "a boolean", other)),
        },
    };
    Ok(Call {
        model,
        model_span,
        stream,
    })
}

fn missing_model() -> ApiError {
    ApiError::invalid_request(
        Some("missing_required_parameter"),
        "You must provide a model parameter.".into(),
    )
    .with_param("model")
}

/// A form upload's call: `model` from its field (the span is the raw value,
/// unquoted), the endpoint's required part checked.
fn read_form_call(body: &[u8], p: Passed) -> Result<Call, ApiError> {
    let parts = multipart::parts(body).ok_or_else(|| {
        ApiError::invalid_request(
            Some("invalid_form"),
            format!(
                "{} takes a multipart/form-data body; this one could not be read as one.",
                p.path()
            ),
        )
    })?;
    let field = |name: &str| parts.iter().find(|part| part.name == name);
    if field(p.required_field()).is_none() {
        let name = p.required_field();
        return Err(ApiError::invalid_request(
            Some("missing_required_parameter"),
            format!("Missing required parameter: '{name}'."),
        ));
    }
    match (field("model"), p.default_model()) {
        (Some(part), _) => {
            let model = body
                .get(part.value.clone())
                .and_then(|v| std::str::from_utf8(v).ok())
                .ok_or_else(|| {
                    ApiError::invalid_request(
                        Some("invalid_value"),
                        "The model field must be UTF-8 text.".into(),
                    )
                    .with_param("model")
                })?;
            Ok(Call {
                model: model.trim().to_string(),
                model_span: Some(part.value.clone()),
                stream: false,
            })
        }
        (None, Some(name)) => Ok(Call {
            model: name.to_string(),
            model_span: None,
            stream: false,
        }),
        (None, None) => Err(missing_model()),
    }
}

pub(super) fn model_not_found(model: &str) -> ApiError {
    ApiError::new(
        404,
        "invalid_request_error",
        Some("model_not_found"),
        format!(
            "The model `{model}` does not exist or you do not have access to it. \
             GET /v1/models lists the models this gateway serves."
        ),
    )
    .with_param("model")
}

fn invalid_type(param: &'static str, want: &str, got: Kind) -> ApiError {
    ApiError::invalid_request(
        Some("invalid_type"),
        format!(
            "Invalid type for '{param}': expected {want}, but got {}.",
            got.name()
        ),
    )
    .with_param(param)
}
