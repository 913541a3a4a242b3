//! Public names: the characters names may use in the document, and what a
//! public name (a model, one of its aliases, or a route) denotes. A leaf:
//! every section's compiler checks names with it.

/// What a public name denotes: a model (by any of its names) or a route.
/// Allow-lists are sets of these, so allowing a model allows its aliases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// An index into `Config::models`.
    Model(usize),
    /// An index into `Config::routes`.
    Route(usize),
}

/// Provider, cluster and project names.
pub(crate) fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Model names appear in URLs, metrics and logs: printable ASCII without
/// characters that would need escaping there.
pub(crate) fn valid_model_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && s.chars()
            .all(|c| c.is_ascii_graphic() && !matches!(c, '"' | '\\' | '?' | '#' | ';' | '='))
}

/// Environment variable names (`api_key_env` and the AWS ones).
pub(crate) fn valid_env_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// HTTP header names (RFC 9110 tokens; no pseudo-headers).
pub(crate) fn valid_header_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(':')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}
