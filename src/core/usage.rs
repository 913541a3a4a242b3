//! Token counts in one set of terms, whatever schema reported them: what
//! translators read, pricing charges and admission settles.

/// Token counts of one exchange, in OpenAI's terms: `input_tokens` counts
/// every prompt token, cached ones (read or written) included;
/// `cached_input_tokens` those read from a cache; `reasoning_tokens` the part
/// of `output_tokens` spent thinking, where the provider reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_input_tokens: u64,
    pub reasoning_tokens: u64,
}
