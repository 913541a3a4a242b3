//! Translate stage, per attempt: the caller's request in the target
//! provider's API (`translate/exchange.rs`), or only `model` rewritten in
//! place when both ends speak the same API.

use super::route;
use super::state::Call;
use crate::config::models::Operation;
use crate::config::Config;
use crate::core::api_error::ApiError;
use crate::core::json::TopLevel;
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
    let path = route.path(op, stream).ok_or_else(|| {
        ApiError::invalid_request(
            Some("unsupported_operation"),
            format!(
                "The model `{model}` is served by provider {:?}, which has no embeddings API.",
                provider.name
            ),
        )
        .with_param("model")
    })?;
    let (new_body, exchange) = if op == Operation::Embeddings {
        // Embeddings only exist between OpenAI-shaped ends.
        let new_body = (model != route.upstream_model).then(|| {
            crate::core::json::splice(
                body,
                call.model_span.clone().unwrap_or(0..0),
                route.upstream_model_json.as_bytes(),
            )
        });
        (new_body, None)
    } else {
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
    };
    // The provider may stream on another URL than the caller asked for.
    let path = match &exchange {
        Some(x) => route.path(op, x.stream).unwrap_or(path),
        None => path,
    };
    Ok(Translated {
        body: new_body,
        exchange,
        path,
    })
}
