//! Metric names.
//!
//! Proxy-wasm stats have no labels, so labels travel inside the name as
//! `;key=value` pairs; Envoy's `stats_tags` (shipped in envoy/) cut them out
//! again, so `/stats/prometheus` shows `meshllm_requests_total{provider=...}`.
//! Label values only ever come from the configuration (unknown models are
//! `none`), which keeps cardinality bounded by the config.

pub const REQUESTS_TOTAL: &str = "meshllm_requests_total";

/// A label value with the characters that would break tag extraction replaced.
fn label(value: &str) -> std::borrow::Cow<'_, str> {
    if value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':' | b'/'))
    {
        std::borrow::Cow::Borrowed(value)
    } else {
        std::borrow::Cow::Owned(
            value
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '/') {
                        c
                    } else {
                        '_'
                    }
                })
                .collect(),
        )
    }
}

pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "none",
    }
}

/// `meshllm_requests_total` for one provider, public model and status class.
pub fn requests_total(provider: &str, model: &str, status: u16) -> String {
    format!(
        "{REQUESTS_TOTAL};provider={};model={};status_class={}",
        label(provider),
        label(model),
        status_class(status)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_labels() {
        assert_eq!(
            requests_total("openai", "gpt-4.1", 200),
            "meshllm_requests_total;provider=openai;model=gpt-4.1;status_class=2xx"
        );
        assert_eq!(
            requests_total("a;b", "m=x", 0),
            "meshllm_requests_total;provider=a_b;model=m_x;status_class=none"
        );
        assert_eq!(status_class(429), "4xx");
        assert_eq!(status_class(503), "5xx");
    }
}
