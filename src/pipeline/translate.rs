//! Translate stage, per attempt: the caller's request in the target
//! provider's API (`translate/exchange.rs`), or only `model` rewritten in
//! place when both ends speak the same API.

use super::route;
use super::state::Call;
use crate::config::models::{ModelRoute, Operation, Passed};
use crate::config::Config;
use crate::core::api_error::ApiError;
use crate::core::json::{splice, TopLevel};
use crate::core::schema::Schema;
use crate::translate::exchange::{self, Exchange, Inbound};

/// The request as the target gets it.
pub(super) struct Translated<'c> {
    /// The new body; None when the caller's goes as it is.
    pub body: Option<Vec<u8>>,
    /// How caller and provider differ (None for embeddings).
    pub exchange: Option<Exchange>,
    /// The provider's path for the call.
    pub path: &'c str,
}

/// The translate stage for `target`.
pub(super) fn translate<'c>(
    config: &'c Config,
    caller: Schema,
    op: Operation,
    (body, doc): (&[u8], &TopLevel),
    call: &Call,
    target: usize,
) -> Result<Translated<'c>, ApiError> {
    let route = &config.models[target];
    let provider = &config.providers[route.provider];
    let (model, stream) = (call.model.as_str(), call.stream);
    if provider.key_missing {
        return Err(route::unusable(config, target, op, model));
    }
    let path = route
        .path(op, stream)
        .ok_or_else(|| route::unusable(config, target, op, model))?;
    let (new_body, exchange) = match op {
        Operation::ChatCompletions | Operation::Passed(Passed::Completions) => {
            // Completions are OpenAI's on both ends: only `model` changes,
            // and a stream is asked for its usage, as for chat.
            let inbound = Inbound {
                caller,
                body,
                doc,
                model_span: call.model_span.clone(),
                model,
                stream,
            };
            let (b, x) = exchange::translate_request(&inbound, route, provider)?;
            (b, Some(x))
        }
        // The other endpoints exist only where the caller's API is the
        // provider's: the body goes as it is, with the upstream model.
        Operation::Embeddings | Operation::Passed(_) | Operation::Account(_) => {
            (passed_body(body, call, route, op), None)
        }
    };
    // The provider may stream on another URL than the caller asked for.
    let path = match &exchange {
        Some(x) if x.provider == Schema::Responses => {
            route.responses_path.as_deref().unwrap_or(path)
        }
        Some(x) => route.path(op, x.stream).unwrap_or(path),
        None => path,
    };
    Ok(Translated {
        body: new_body,
        exchange,
        path,
    })
}

/// A passed body with the upstream model in it (None: unchanged). A form
/// takes the bare name in its field; a JSON body without `model` (routed by
/// OpenAI's default) gets one when the upstream name differs.
fn passed_body(body: &[u8], call: &Call, route: &ModelRoute, op: Operation) -> Option<Vec<u8>> {
    if call.model == route.upstream_model {
        return None;
    }
    let form = matches!(op, Operation::Passed(p) if p.is_form());
    match (&call.model_span, form) {
        (Some(span), true) => Some(splice(body, span.clone(), route.upstream_model.as_bytes())),
        (Some(span), false) => Some(splice(
            body,
            span.clone(),
            route.upstream_model_json.as_bytes(),
        )),
        (None, true) => None,
        (None, false) => {
            let open = body.iter().position(|&b| b == b'{')?;
            let empty = body
                .get(open + 1..)?
                .iter()
                .find(|b| !b.is_ascii_whitespace())
                == Some(&b'}');
            let field = format!(
                "\"model\":{}{}",
                route.upstream_model_json,
                if empty { "" } else { "," }
            );
            Some(splice(body, open + 1..open + 1, field.as_bytes()))
        }
    }
}
