//! What every stage answers with: go on or hold ([`Flow`]), or, when the
//! gateway itself fails, the caller's 500 (`internal`).

use crate::core::api_error::ApiError;

/// What a callback tells the proxy: go on, or hold the request (or answer)
/// until the filter says otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Pause,
}

/// A failure of the gateway itself, logged, as the caller's 500.
pub(super) fn internal(message: String) -> ApiError {
    log::error!("{message}");
    ApiError::new(
        500,
        "server_error",
        Some("gateway_error"),
        format!("Gateway error: {message}."),
    )
}

/// The 503 every request gets while the proxy holds no valid configuration
/// (the adapters answer it themselves: there is no filter to run).
pub fn not_configured() -> ApiError {
    ApiError::new(
        503,
        "server_error",
        Some("gateway_not_configured"),
        "The gateway has no valid configuration; see the proxy's log.".into(),
    )
}
