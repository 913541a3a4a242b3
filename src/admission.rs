//! Quotas and budgets on the request path: who is calling, what the request
//! reserves, whether it is admitted, and what it finally cost.
//!
//! The listener half calls `identify` when headers arrive, `admit` once the
//! body is read and the targets are chosen, and `settle` when the request is
//! over (answered, failed or abandoned), so every reservation is reconciled
//! exactly once. The counting itself lives in `quota`, over shared data.

use std::rc::Rc;

use crate::api::openai::ApiError;
use crate::config::Config;
use crate::host::Host;
use crate::identity::{Caller, IdentityError};
use crate::limits::{limit_field, tag_value, Facts, LimitRule, ReservationPolicy, DEFAULT_ALERTS};
use crate::pricing::{cost_micro_usd, Prices};
use crate::quota::{self, Amounts, Held, Limit, Meter, Refusal, Standing, Update};
use crate::translate::{Schema, Usage};

/// Who called and which attribution tags the request carries.
#[derive(Debug, Clone, Default)]
pub struct Who {
    pub caller: Option<Caller>,
    /// (tag index, sanitised value).
    pub tags: Vec<(usize, String)>,
}

impl Who {
    /// (namespace, service) for metrics; `unknown` when not identified.
    pub fn names(&self) -> (&str, &str) {
        match &self.caller {
            Some(c) => (c.namespace.as_str(), c.service.as_str()),
            None => ("unknown", "unknown"),
        }
    }

    /// `namespace/service` for logs, or `-` when callers are not identified.
    pub fn label(&self) -> String {
        match &self.caller {
            Some(c) => format!("{}/{}", c.namespace, c.service),
            None => "-".into(),
        }
    }
}

/// Reads the caller's identity and tags; removes the headers that carried
/// them so they never reach a provider. Must run before client credentials
/// are stripped (a virtual key is one).
pub fn identify(config: &Config, host: &mut dyn Host) -> Result<Who, ApiError> {
    let caller = match &config.identity {
        None => None,
        Some(policy) => {
            let resolved = policy.resolve(&*host);
            if let Some(name) = policy.header() {
                if host.request_header(name).is_some() {
                    host.remove_request_header(name).map_err(|e| {
                        ApiError::new(
                            500,
                            "server_error",
                            Some("gateway_error"),
                            format!("Gateway error: could not remove the identity header: {e}."),
                        )
                    })?;
                }
            }
            match resolved {
                Ok(c) => Some(c),
                Err(IdentityError::UnknownKey) => {
                    return Err(ApiError::new(
                        401,
                        "invalid_request_error",
                        Some("invalid_api_key"),
                        "Incorrect API key provided: this gateway does not know the key.".into(),
                    ))
                }
                Err(IdentityError::Unidentified(why)) => {
                    return Err(ApiError::new(
                        403,
                        "permission_error",
                        Some("unidentified_caller"),
                        format!("The gateway could not identify the caller: {why}."),
                    ))
                }
            }
        }
    };
    let mut tags = Vec::new();
    for (i, tag) in config.tags.iter().enumerate() {
        if let Some(v) = host.request_header(&tag.header) {
            tags.push((i, tag_value(&v).to_string()));
            let _ = host.remove_request_header(&tag.header);
        }
    }
    Ok(Who { caller, tags })
}

/// Creates the buckets known before any request, so that every write at
/// request time is compare-and-swapped (a missing key cannot be).
pub fn prepare_buckets(config: &Config, store: &mut dyn crate::host::SharedData) {
    let mesh = config.quotas.iter().flat_map(|p| p.rules.iter());
    let namespaces = config.namespaces.values().flat_map(|p| p.rules.iter());
    for key in mesh.chain(namespaces).filter_map(|r| r.static_bucket()) {
        quota::ensure(store, &key);
    }
}

/// The rules that apply to a request: the mesh's, then its namespace's.
fn rules<'a>(
    config: &'a Config,
    namespace: &'a [Rc<LimitRule>],
) -> impl Iterator<Item = &'a Rc<LimitRule>> {
    config
        .quotas
        .iter()
        .flat_map(|p| p.rules.iter())
        .chain(namespace)
}

/// The mesh's reservation policy and alert thresholds (the defaults when
/// only namespaces set rules).
fn settings(config: &Config) -> (ReservationPolicy, &[u32]) {
    match &config.quotas {
        Some(p) => (p.reservation, &p.alert_percents),
        None => (ReservationPolicy::default(), DEFAULT_ALERTS),
    }
}

/// The model a budget rule switches this request to, if one has passed its
/// threshold: (new model, rule name). A rule whose replacement the caller
/// may not use (`allowed` says no) does not apply.
pub fn downgrade(
    config: &Config,
    host: &dyn Host,
    who: &Who,
    model: &str,
    namespace_rules: &[Rc<LimitRule>],
    allowed: &dyn Fn(&str) -> bool,
) -> Option<(String, String)> {
    let now = host.now_unix_millis();
    let facts = Facts {
        caller: who.caller.as_ref(),
        model,
        tags: &who.tags,
    };
    rules(config, namespace_rules).find_map(|rule| {
        let d = rule.downgrade.as_ref()?;
        let to = d.models.get(model).filter(|to| allowed(to))?;
        let key = rule.bucket(&facts)?;
        let over = quota::standings(host, &key, &rule.limits, now)
            .iter()
            .any(|s| quota::percent(s.used, s.limit.max) >= d.at_percent);
        over.then(|| (to.clone(), rule.name.clone()))
    })
}

/// What an admitted request holds until it is settled.
#[derive(Debug, Clone)]
pub struct Admission {
    /// (rule, bucket key, reservation).
    held: Vec<(Rc<LimitRule>, String, Held)>,
    reserved: Amounts,
    prompt_estimate: u64,
    output_estimate: u64,
    bytes_per_token: u64,
    /// Headers for the caller's answer: rate-limit state and budget alerts.
    pub headers: Vec<(String, String)>,
}

/// A refused request: the error and the headers that go with it.
pub struct Rejection {
    pub error: ApiError,
    pub headers: Vec<(String, String)>,
    /// The rule that refused, for metrics.
    pub rule: String,
    pub reason: &'static str,
}

/// The request's shape, for the reservation estimate.
pub struct Ask<'a> {
    pub model: &'a str,
    pub body_len: usize,
    /// The most output the request asks for (`max_tokens` and kin).
    pub max_output: Option<u64>,
    /// Candidate targets (indices into `Config::models`): the reservation
    /// is priced at the most expensive.
    pub chain: &'a [usize],
    pub caller_schema: Schema,
}

/// Admission: reserves the estimate in every bucket the request draws from.
/// None when no quota applies to it.
pub fn admit(
    config: &Config,
    host: &mut dyn Host,
    who: &Who,
    ask: &Ask,
    namespace_rules: &[Rc<LimitRule>],
) -> Result<Option<Admission>, Box<Rejection>> {
    let now = host.now_unix_millis();
    let facts = Facts {
        caller: who.caller.as_ref(),
        model: ask.model,
        tags: &who.tags,
    };
    let matched: Vec<(&Rc<LimitRule>, String)> = rules(config, namespace_rules)
        .filter_map(|r| r.bucket(&facts).map(|k| (r, k)))
        .collect();
    if matched.is_empty() {
        return Ok(None);
    }
    let (reservation, alert_percents) = settings(config);
    let (prompt, output) = reservation.estimate(ask.body_len, ask.max_output);
    let estimate = Usage {
        input_tokens: prompt,
        output_tokens: output,
        cached_input_tokens: 0,
        reasoning_tokens: 0,
    };
    let micro_usd = ask
        .chain
        .iter()
        .filter_map(|&m| prices_of(config, m))
        .map(|p| cost_micro_usd(&p, &estimate))
        .max()
        .unwrap_or(0);
    let amounts = Amounts {
        requests: 1,
        tokens: prompt + output,
        micro_usd,
    };
    let buckets: Vec<(&str, &[Limit])> = matched
        .iter()
        .map(|(r, k)| (k.as_str(), r.limits.as_slice()))
        .collect();
    match quota::reserve_all(host, &buckets, &amounts, now) {
        Ok(reserved) => {
            for ((rule, key), r) in matched.iter().zip(&reserved) {
                for u in r.updates.iter().enumerate() {
                    report(host, alert_percents, rule, key, who, u);
                }
            }
            let all: Vec<(&LimitRule, &Standing)> = matched
                .iter()
                .zip(&reserved)
                .flat_map(|((rule, _), r)| r.updates.iter().map(move |u| (&***rule, &u.standing)))
                .collect();
            let mut headers =
                rate_limit_headers(ask.caller_schema, all.iter().map(|(_, s)| **s), now);
            if let Some(alert) = alert_header(&all, alert_percents) {
                headers.push((BUDGET_HEADER.into(), alert));
            }
            let held = matched
                .into_iter()
                .zip(reserved)
                .map(|((rule, k), r)| (Rc::clone(rule), k, r.held))
                .collect();
            Ok(Some(Admission {
                held,
                reserved: amounts,
                prompt_estimate: prompt,
                output_estimate: output,
                bytes_per_token: reservation.bytes_per_token.max(1),
                headers,
            }))
        }
        Err((index, refusal)) => {
            let rule = matched.get(index).map(|(r, _)| r);
            let name = rule.map_or("", |r| r.name.as_str());
            Err(Box::new(rejection(
                ask.caller_schema,
                name,
                &refusal,
                &amounts,
                now,
            )))
        }
    }
}

/// How a request ended, for settlement.
pub struct Outcome {
    /// Token counts the provider reported.
    pub usage: Option<Usage>,
    /// The target that answered, when one did.
    pub served: Option<usize>,
    /// The status the caller got (0: none).
    pub status: u16,
    /// Answer bytes passed to the caller (charged when a stream was cut
    /// before the provider reported usage).
    pub response_bytes: u64,
}

/// What a request was finally charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Charge {
    pub usage: Usage,
    pub micro_usd: u64,
    /// The token counts are estimates (the provider reported none).
    pub estimated: bool,
}

/// The cost of a finished request, whether or not quotas apply.
pub fn charge(config: &Config, admission: Option<&Admission>, outcome: &Outcome) -> Charge {
    let prices = outcome.served.and_then(|m| prices_of(config, m));
    let (usage, estimated) = match outcome.usage {
        Some(u) => (u, false),
        // A provider that answered but reported nothing (or a stream the
        // caller abandoned): charge the prompt estimate and what was sent.
        None if (200..300).contains(&outcome.status) => {
            let Some(a) = admission else {
                return Charge::default();
            };
            let sent = outcome.response_bytes.div_ceil(a.bytes_per_token);
            (
                Usage {
                    input_tokens: a.prompt_estimate,
                    output_tokens: sent.min(a.output_estimate),
                    cached_input_tokens: 0,
                    reasoning_tokens: 0,
                },
                true,
            )
        }
        // Failed before any answer: providers do not bill errors.
        None => (Usage::default(), false),
    };
    Charge {
        usage,
        micro_usd: prices.map_or(0, |p| cost_micro_usd(&p, &usage)),
        estimated,
    }
}

/// Replaces the request's reservations with what it cost; logs and gauges
/// budget thresholds crossed on the way.
pub fn settle(
    config: &Config,
    host: &mut dyn Host,
    who: &Who,
    admission: &Admission,
    charge: &Charge,
) {
    let (_, alert_percents) = settings(config);
    let now = host.now_unix_millis();
    let actual = Amounts {
        requests: admission.reserved.requests,
        tokens: charge
            .usage
            .input_tokens
            .saturating_add(charge.usage.output_tokens),
        micro_usd: charge.micro_usd,
    };
    for (rule, key, held) in &admission.held {
        for (i, u) in quota::settle(host, held, &actual, now).iter().enumerate() {
            report(host, alert_percents, rule, key, who, (i, u));
        }
    }
}

/// Logs a crossed alert threshold (once: only the write that crossed it
/// sees the crossing) and updates the usage gauge of the `index`th limit.
fn report(
    host: &mut dyn Host,
    alerts: &[u32],
    rule: &LimitRule,
    key: &str,
    who: &Who,
    (index, u): (usize, &Update),
) {
    let s = &u.standing;
    if let Some(pct) = u.crossed(alerts) {
        log::warn!(
            "budget alert: limit {:?} ({}) of bucket {key:?} passed {pct}% (used {} of {}), caller {}",
            rule.name,
            limit_field(&s.limit),
            shown(s.limit.meter, s.used),
            shown(s.limit.meter, s.limit.max),
            who.label(),
        );
    }
    let percent = u64::from(quota::percent(s.used, s.limit.max));
    // A bucket without per-caller parts has its names ready.
    match rule.static_gauges.get(index).filter(|_| !key.contains('|')) {
        Some(name) => host.gauge(name, percent),
        None => host.gauge(&rule.gauge(key, &s.limit), percent),
    }
}

pub const BUDGET_HEADER: &str = "x-meshllm-budget";

/// `rule:limit=NN%` for every limit at or past the first alert threshold.
fn alert_header(all: &[(&LimitRule, &Standing)], alerts: &[u32]) -> Option<String> {
    let first = *alerts.first()?;
    let parts: Vec<String> = all
        .iter()
        .filter_map(|(rule, s)| {
            let pct = quota::percent(s.used, s.limit.max);
            (pct >= first).then(|| format!("{}:{}={pct}%", rule.name, limit_field(&s.limit)))
        })
        .collect();
    (!parts.is_empty()).then(|| parts.join(", "))
}

fn prices_of(config: &Config, model: usize) -> Option<Prices> {
    let a = &config.models.get(model)?.attributes;
    Some(Prices {
        input: a.input_price?,
        output: a.output_price?,
        cached_input: a.cached_input_price,
    })
}

/// An amount as people read it: dollars for money, a count otherwise.
fn shown(meter: Meter, n: u64) -> String {
    match meter {
        Meter::MicroUsd => format!("${}.{:06}", n / 1_000_000, n % 1_000_000),
        _ => n.to_string(),
    }
}

fn rejection(
    schema: Schema,
    rule: &str,
    refusal: &Refusal,
    asked: &Amounts,
    now: u64,
) -> Rejection {
    let mut headers: Vec<(String, String)> = Vec::new();
    let (error, reason) = match refusal {
        Refusal::Exceeded { standing } => {
            let l = standing.limit;
            let wait_ms = standing.resets_at_ms.saturating_sub(now);
            let wait = quota::openai_duration(wait_ms);
            headers.push((
                "retry-after".into(),
                wait_ms.div_ceil(1000).max(1).to_string(),
            ));
            headers.extend(rate_limit_headers(schema, [*standing], now));
            let what = limit_field(&l);
            match l.meter {
                Meter::MicroUsd => {
                    // Waiting a few seconds will not help: say so to the SDKs.
                    headers.push(("x-should-retry".into(), "false".into()));
                    (
                        ApiError::new(
                            429,
                            "insufficient_quota",
                            Some("insufficient_quota"),
                            format!(
                                "You exceeded your budget: limit '{rule}' allows {} ({what}); {} is used and this request needs up to {}. The budget resets in {wait}.",
                                shown(l.meter, l.max),
                                shown(l.meter, standing.used),
                                shown(l.meter, asked.micro_usd),
                            ),
                        ),
                        "budget",
                    )
                }
                meter => {
                    let unit = if meter == Meter::Requests {
                        "requests"
                    } else {
                        "tokens"
                    };
                    (
                        ApiError::new(
                            429,
                            unit,
                            Some("rate_limit_exceeded"),
                            format!(
                                "Rate limit reached on {what} in limit '{rule}': Limit {}, Used {}, Requested {}. Please try again in {wait}.",
                                l.max,
                                standing.used,
                                asked.of(meter),
                            ),
                        ),
                        "rate",
                    )
                }
            }
        }
        Refusal::TooLarge { limit, requested } => {
            headers.push(("x-should-retry".into(), "false".into()));
            (
                ApiError::new(
                    429,
                    if limit.meter == Meter::MicroUsd { "insufficient_quota" } else { "tokens" },
                    Some(if limit.meter == Meter::MicroUsd { "insufficient_quota" } else { "rate_limit_exceeded" }),
                    format!(
                        "Request too large for limit '{rule}' ({}): Limit {}, Requested {}. Lower max_tokens or the prompt size.",
                        limit_field(limit),
                        shown(limit.meter, limit.max),
                        shown(limit.meter, *requested),
                    ),
                ),
                "too_large",
            )
        }
        Refusal::Busy => {
            headers.push(("retry-after".into(), "1".into()));
            (
                ApiError::new(
                    429,
                    "requests",
                    Some("rate_limit_exceeded"),
                    "The gateway could not update its quota counters in time; please try again."
                        .into(),
                ),
                "busy",
            )
        }
    };
    Rejection {
        error,
        headers,
        rule: rule.to_string(),
        reason,
    }
}

/// The caller's rate-limit headers, in its API's own spelling, from the
/// tightest request limit and the tightest token limit that apply.
pub fn rate_limit_headers(
    schema: Schema,
    standings: impl IntoIterator<Item = Standing>,
    now: u64,
) -> Vec<(String, String)> {
    let mut requests: Option<Standing> = None;
    let mut tokens: Option<Standing> = None;
    for s in standings {
        let slot = match s.limit.meter {
            Meter::Requests => &mut requests,
            Meter::Tokens => &mut tokens,
            Meter::MicroUsd => continue,
        };
        if slot.is_none_or(|t| s.remaining() < t.remaining()) {
            *slot = Some(s);
        }
    }
    // Header names spelled out (not formatted) per schema and meter.
    const OPENAI: [[&str; 3]; 2] = [
        [
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests",
        ],
        [
            "x-ratelimit-limit-tokens",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-reset-tokens",
        ],
    ];
    const ANTHROPIC: [[&str; 3]; 2] = [
        [
            "anthropic-ratelimit-requests-limit",
            "anthropic-ratelimit-requests-remaining",
            "anthropic-ratelimit-requests-reset",
        ],
        [
            "anthropic-ratelimit-tokens-limit",
            "anthropic-ratelimit-tokens-remaining",
            "anthropic-ratelimit-tokens-reset",
        ],
    ];
    let mut out = Vec::new();
    for (kind, s) in [requests, tokens].into_iter().enumerate() {
        let Some(s) = s else { continue };
        let wait = s.resets_at_ms.saturating_sub(now);
        let (names, reset) = match schema {
            Schema::OpenAi | Schema::Converse => (&OPENAI, quota::openai_duration(wait)),
            Schema::Anthropic => (&ANTHROPIC, rfc3339(s.resets_at_ms)),
            // Google's API sends no rate-limit headers; 429s carry retry-after.
            Schema::Gemini => continue,
        };
        let Some([limit, remaining, resets]) = names.get(kind) else {
            continue;
        };
        out.push((limit.to_string(), s.limit.max.to_string()));
        out.push((remaining.to_string(), s.remaining().to_string()));
        out.push((resets.to_string(), reset));
    }
    out
}

/// `2026-11-21T07:22:53Z` for a Unix time in milliseconds.
pub fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = quota::civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn standing(meter: Meter, max: u64, used: u64, resets_at_ms: u64) -> Standing {
        Standing {
            limit: Limit {
                meter,
                window: quota::Window::Minute,
                max,
            },
            used,
            resets_at_ms,
        }
    }

    #[test]
    fn rate_limit_headers_pick_the_tightest_limit() {
        let now = 1_000_000;
        let all = [
            standing(Meter::Requests, 100, 10, now + 30_000),
            standing(Meter::Requests, 20, 15, now + 6_000),
            standing(Meter::Tokens, 1000, 10, now + 500),
            standing(Meter::MicroUsd, 1, 1, now),
        ];
        let h = rate_limit_headers(Schema::OpenAi, all, now);
        let want: Vec<(String, String)> = [
            ("x-ratelimit-limit-requests", "20"),
            ("x-ratelimit-remaining-requests", "5"),
            ("x-ratelimit-reset-requests", "6s"),
            ("x-ratelimit-limit-tokens", "1000"),
            ("x-ratelimit-remaining-tokens", "990"),
            ("x-ratelimit-reset-tokens", "500ms"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        assert_eq!(h, want);
        let a = rate_limit_headers(Schema::Anthropic, all, now);
        assert_eq!(
            a[0],
            ("anthropic-ratelimit-requests-limit".into(), "20".into())
        );
        assert_eq!(a[2].0, "anthropic-ratelimit-requests-reset");
        assert!(rate_limit_headers(Schema::Gemini, all, now).is_empty());
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_245_773_123), "2026-11-21T07:22:53Z");
    }

    #[test]
    fn money_is_shown_in_dollars() {
        assert_eq!(shown(Meter::MicroUsd, 12_500_000), "$12.500000");
        assert_eq!(shown(Meter::MicroUsd, 7), "$0.000007");
        assert_eq!(shown(Meter::Tokens, 7), "7");
    }
}
