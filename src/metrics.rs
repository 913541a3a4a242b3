//! Metric names.
//!
//! Proxy-wasm stats have no labels, so labels travel inside the name as
//! `;key=value` pairs; Envoy's `stats_tags` (shipped in envoy/) cut them out
//! again, so `/stats/prometheus` shows `meshllm_requests_total{provider=...}`.
//! Label values only ever come from the configuration (unknown models are
//! `none`), which keeps cardinality bounded by the config.

pub const REQUESTS_TOTAL: &str = "meshllm_requests_total";
pub const COST_TOTAL: &str = "meshllm_cost_micro_usd_total";
pub const TOKENS_TOTAL: &str = "meshllm_tokens_total";
pub const QUOTA_REJECTIONS_TOTAL: &str = "meshllm_quota_rejections_total";
pub const BUDGET_USED_PERCENT: &str = "meshllm_budget_used_percent";

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

/// The caller's namespace and service, then attribution tags (values the
/// config does not name are `other`).
fn caller_labels(namespace: &str, service: &str, tags: &[(&str, &str)]) -> String {
    let mut out = format!(";namespace={};service={}", label(namespace), label(service));
    for (name, value) in tags {
        out.push_str(&format!(";tag_{}={}", label(name), label(value)));
    }
    out
}

/// `meshllm_cost_micro_usd_total`: what requests cost, by caller and model.
pub fn cost_total(namespace: &str, service: &str, model: &str, tags: &[(&str, &str)]) -> String {
    format!(
        "{COST_TOTAL}{};model={}",
        caller_labels(namespace, service, tags),
        label(model)
    )
}

/// `meshllm_tokens_total` by token type (input, output, cached, reasoning).
pub fn tokens_total(
    namespace: &str,
    service: &str,
    model: &str,
    kind: &str,
    tags: &[(&str, &str)],
) -> String {
    format!(
        "{TOKENS_TOTAL}{};model={};type={kind}",
        caller_labels(namespace, service, tags),
        label(model)
    )
}

/// `meshllm_quota_rejections_total` by caller, limit and reason (rate,
/// budget, too_large, busy).
pub fn quota_rejections_total(namespace: &str, service: &str, limit: &str, reason: &str) -> String {
    format!(
        "{QUOTA_REJECTIONS_TOTAL}{};limit={};reason={reason}",
        caller_labels(namespace, service, &[]),
        label(limit)
    )
}

/// `meshllm_budget_used_percent` of one limit of one bucket; `scope` is
/// the bucket's per-value part (`svc=chat`), empty for a shared bucket.
pub fn budget_used_percent(limit: &str, kind: &str, scope: &str) -> String {
    format!(
        "{BUDGET_USED_PERCENT};limit={};kind={kind};scope={}",
        label(limit),
        label(if scope.is_empty() { "all" } else { scope })
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
