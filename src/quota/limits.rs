//! Which quota buckets a request draws from, and how much it reserves.
//!
//! The `quotas` section lists limit rules. A rule's `match` picks the
//! requests it applies to; every rule that matches applies, so a service's
//! own limit and its namespace's limit both hold. In `match`, a field that is
//! absent matches everything and shares one bucket; a value matches only
//! that value; `"*"` gives every distinct value its own bucket (identities
//! and model names come from the mesh and the config, so the bucket set stays
//! bounded). Attribution tags only narrow: a tag rule is an extra limit on
//! the tagged requests, never a way out of the caller's own limits.
//!
//! `match.model` binds what serves, not the name a caller typed: a rule on a
//! model binds every target position where that model may serve, however
//! the request reached it (its name, an alias, a namespace alias, a route,
//! `x-meshllm-models`); a rule on a route binds the route's targets in the
//! requests that name the route; `"*"` gives each model its own bucket.
//! Admission (`admission::admit`) turns that into reservations.
//!
//! `buckets` stores the counts; this module only decides what to count.

use std::collections::HashMap;
use std::rc::Rc;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::access::identity::Caller;
use crate::config::error::ConfigError;
use crate::config::names::{valid_header_name, valid_model_name, Target};
use crate::quota::buckets::{Limit, Meter, Window};
use crate::quota::store::{compile_store, FailureMode, StoreConfig};

/// How the admission estimate is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReservationPolicy {
    /// Prompt tokens are estimated as request bytes divided by this.
    pub bytes_per_token: u64,
    /// Output reserved when the request sets no maximum.
    pub default_output_tokens: u64,
    /// The most output one request reserves, whatever it asks for.
    pub max_output_tokens: u64,
}

impl Default for ReservationPolicy {
    fn default() -> Self {
        ReservationPolicy {
            bytes_per_token: 4,
            default_output_tokens: 1024,
            max_output_tokens: 8192,
        }
    }
}

impl ReservationPolicy {
    /// (prompt, output) tokens to reserve for a request of `body_len` bytes
    /// that asked for at most `max_output` tokens.
    pub fn estimate(&self, body_len: usize, max_output: Option<u64>) -> (u64, u64) {
        let prompt = (body_len as u64).div_ceil(self.bytes_per_token.max(1));
        let output = max_output
            .unwrap_or(self.default_output_tokens)
            .min(self.max_output_tokens);
        (prompt, output)
    }
}

/// What a rule's `match` says about one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// Absent: every value, one shared bucket.
    Any,
    /// `"*"`: every value, a bucket per value.
    Each,
    Is(String),
}

impl Selector {
    /// None: no match; Some(part): matched, with the bucket-key part.
    fn check<'a>(&self, value: Option<&'a str>) -> Option<Option<&'a str>> {
        match (self, value) {
            (Selector::Any, _) => Some(None),
            (Selector::Each, Some(v)) => Some(Some(v)),
            (Selector::Is(want), Some(v)) if want == v => Some(None),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matcher {
    pub namespace: Selector,
    pub service: Selector,
    pub virtual_key: Selector,
    pub model: Selector,
    /// (tag index, value) pairs that must all be present.
    pub tags: Vec<(usize, String)>,
}

/// Switch models once a bucket's usage passes a threshold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downgrade {
    pub at_percent: u32,
    pub models: HashMap<String, String>,
}

/// What a rule's `match.model` binds, compiled against the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelScope {
    /// No `match.model`: the request as a whole, whatever serves it.
    Request,
    /// `"*"`: every model that may serve the request, each in its own bucket.
    EachModel,
    /// One model (an index into `Config::models`), whichever name led to it.
    Model(usize),
    /// The targets of one route (an index into `Config::routes`), in
    /// requests that name the route.
    Route(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitRule {
    pub name: String,
    pub matcher: Matcher,
    /// What `matcher.model` binds; its `Is` value is the document's own name
    /// of that model or route (an alias in the config is resolved).
    pub scope: ModelScope,
    pub limits: Vec<Limit>,
    pub downgrade: Option<Downgrade>,
    /// Each limit's usage gauge name when the rule has one bucket for every
    /// request (see `static_bucket`), built once here instead of twice per
    /// request; empty when the bucket depends on the caller.
    pub static_gauges: Vec<String>,
    /// Counted in the shared store for every proxy (`shared: true`), with
    /// what to do when the store cannot answer; None: in this proxy only.
    pub shared: Option<FailureMode>,
    /// A shared rule admitted from leases (`lease.rs`); None: exact mode,
    /// one store call per request.
    pub lease: Option<crate::quota::lease::LeasePolicy>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tag {
    pub name: String,
    pub header: String,
    /// Values shown in metrics; any other value is shown as `other`.
    pub metric_values: Vec<String>,
    /// Its metric label, `tag_<name>`.
    pub label: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct QuotaPolicy {
    pub reservation: ReservationPolicy,
    /// Usage percentages that raise an alert, ascending.
    pub alert_percents: Vec<u32>,
    pub rules: Vec<Rc<LimitRule>>,
    /// Where shared rules count (`quotas.store`); None: no rule is shared.
    pub store: Option<StoreConfig>,
}

/// Alert thresholds when `quotas.alerts` is not set.
pub const DEFAULT_ALERTS: &[u32] = &[50, 80, 100];

/// What a request is known by when rules are matched.
pub struct Facts<'a> {
    pub caller: Option<&'a Caller>,
    /// The document's name of the model (or route) whose bucket is wanted:
    /// `match.model` is compared with it, and `"*"` keys buckets by it.
    pub model: &'a str,
    /// (tag index, value) for every tag the request carries.
    pub tags: &'a [(usize, String)],
}

const KEY_PREFIX: &str = "meshllm/quota/v1/";

impl LimitRule {
    /// The shared-data key of the bucket this request draws from, if the
    /// rule applies to it.
    pub fn bucket(&self, facts: &Facts) -> Option<String> {
        let m = &self.matcher;
        let caller = facts.caller;
        let parts = [
            (
                "ns",
                m.namespace.check(caller.map(|c| c.namespace.as_str()))?,
            ),
            ("svc", m.service.check(caller.map(|c| c.service.as_str()))?),
            (
                "key",
                m.virtual_key
                    .check(caller.and_then(|c| c.virtual_key.as_deref()))?,
            ),
            ("model", m.model.check(Some(facts.model))?),
        ];
        if !m.tags.iter().all(|want| facts.tags.contains(want)) {
            return None;
        }
        let mut key = format!("{KEY_PREFIX}{}", self.name);
        for (field, value) in parts {
            if let Some(v) = value {
                key.push('|');
                key.push_str(field);
                key.push('=');
                key.push_str(v);
            }
        }
        Some(key)
    }

    /// The usage gauge of `limit` in bucket `key`, labelled with the
    /// bucket's caller: its per-value part, the rule's exact match, or all.
    pub fn gauge(&self, key: &str, limit: &Limit) -> String {
        let scope = key.split_once('|').map_or("", |(_, rest)| rest);
        let part = |field: &str, selector: &'_ Selector| -> String {
            scope
                .split('|')
                .find_map(|p| p.strip_prefix(field)?.strip_prefix('='))
                .or(match selector {
                    Selector::Is(v) => Some(v.as_str()),
                    _ => None,
                })
                .unwrap_or("all")
                .to_string()
        };
        crate::metrics::budget_used_percent(
            &part("ns", &self.matcher.namespace),
            &part("svc", &self.matcher.service),
            &self.name,
            limit_field(limit),
            scope,
        )
    }

    /// A bucket known before any request (no `"*"`): created at start-up so
    /// every request-time write is compare-and-swapped.
    pub fn static_bucket(&self) -> Option<String> {
        let m = &self.matcher;
        let each = [&m.namespace, &m.service, &m.virtual_key, &m.model]
            .iter()
            .any(|s| **s == Selector::Each);
        (!each).then(|| format!("{KEY_PREFIX}{}", self.name))
    }

    /// Every bucket known before any request: the static one, or one per
    /// model when only `match.model` is `"*"`. Created at start-up so that
    /// every request-time write to them is compare-and-swapped.
    pub fn known_buckets<'a>(&self, models: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        if let Some(key) = self.static_bucket() {
            return vec![key];
        }
        let m = &self.matcher;
        let per_caller = [&m.namespace, &m.service, &m.virtual_key]
            .iter()
            .any(|s| **s == Selector::Each);
        if per_caller || self.scope != ModelScope::EachModel {
            return Vec::new();
        }
        models
            .into_iter()
            .map(|model| format!("{KEY_PREFIX}{}|model={model}", self.name))
            .collect()
    }
}

/// A tag value as it may appear in logs and bucket keys; anything else is
/// refused as `invalid` rather than trusted.
pub fn tag_value(raw: &str) -> &str {
    let v = raw.trim();
    let ok = !v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if ok {
        v
    } else {
        "invalid"
    }
}

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAttribution {
    tags: Vec<RawTag>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTag {
    name: String,
    header: String,
    #[serde(default)]
    metric_values: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuotas {
    #[serde(default)]
    reservation: Option<RawReservation>,
    #[serde(default)]
    alerts: Option<Vec<u32>>,
    #[serde(default)]
    limits: Vec<Value>,
    #[serde(default)]
    store: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReservation {
    #[serde(default)]
    bytes_per_token: Option<u64>,
    #[serde(default)]
    default_output_tokens: Option<u64>,
    #[serde(default)]
    max_output_tokens: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    service: Option<String>,
    #[serde(default)]
    virtual_key: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    tags: Map<String, Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDowngrade {
    at_percent: u32,
    models: HashMap<String, String>,
}

/// The limit fields of a rule and what each counts (`usd_*` values are
/// dollars, stored as micro-dollars).
const LIMIT_FIELDS: &[(&str, Meter, Window)] = &[
    ("requests_per_minute", Meter::Requests, Window::Minute),
    ("requests_per_day", Meter::Requests, Window::Day),
    ("requests_per_month", Meter::Requests, Window::Month),
    ("tokens_per_minute", Meter::Tokens, Window::Minute),
    ("tokens_per_day", Meter::Tokens, Window::Day),
    ("tokens_per_month", Meter::Tokens, Window::Month),
    ("usd_per_minute", Meter::MicroUsd, Window::Minute),
    ("usd_per_day", Meter::MicroUsd, Window::Day),
    ("usd_per_month", Meter::MicroUsd, Window::Month),
];

/// `tokens_per_minute` and kin: a limit as the config spells it.
pub fn limit_field(limit: &Limit) -> &'static str {
    LIMIT_FIELDS
        .iter()
        .find(|(_, meter, window)| (*meter, *window) == (limit.meter, limit.window))
        .map_or("limit", |(name, _, _)| name)
}

/// Where a rule's names must be found: configured models and routes,
/// virtual keys, and whether callers are identified at all.
#[derive(Clone, Copy)]
pub struct Known<'a> {
    /// What a public name denotes, with the document's own name for it (a
    /// model's name for any of its aliases); None for an unknown name.
    pub model: &'a dyn Fn(&str) -> Option<(Target, String)>,
    pub virtual_key: &'a dyn Fn(&str) -> bool,
    pub identity: bool,
    /// The store's default failure mode when `quotas.store` is configured;
    /// None: a rule cannot be shared.
    pub store: Option<FailureMode>,
    /// `quotas.store.lease.proxies`: shared rules lease by default.
    pub store_lease: Option<u64>,
}

/// Compiles `attribution`.
pub fn compile_attribution(value: Option<&Value>) -> Result<Vec<Tag>, ConfigError> {
    let Some(value) = value else {
        return Ok(Vec::new());
    };
    let raw = RawAttribution::deserialize(value)
        .map_err(|e| ConfigError::new("attribution", e.to_string()))?;
    let mut tags: Vec<Tag> = Vec::with_capacity(raw.tags.len());
    for (i, t) in raw.tags.into_iter().enumerate() {
        let at = format!("attribution.tags[{i}]");
        if !valid_model_name(&t.name) || tags.iter().any(|x| x.name == t.name) {
            return Err(ConfigError::new(
                format!("{at}.name"),
                format!("{:?} is not a valid, unique tag name", t.name),
            ));
        }
        let header = t.header.to_ascii_lowercase();
        if !valid_header_name(&header) {
            return Err(ConfigError::new(
                format!("{at}.header"),
                format!("{:?} is not a valid header name", t.header),
            ));
        }
        for (j, v) in t.metric_values.iter().enumerate() {
            if tag_value(v) != v || v == "other" {
                return Err(ConfigError::new(
                    format!("{at}.metric_values[{j}]"),
                    format!("{v:?} is not a valid tag value (letters, digits, . _ : -; at most 64; not \"other\")"),
                ));
            }
        }
        tags.push(Tag {
            label: format!("tag_{}", t.name),
            name: t.name,
            header,
            metric_values: t.metric_values,
        });
    }
    Ok(tags)
}

/// Compiles `quotas`; None when it is absent.
pub fn compile_quotas(
    value: Option<&Value>,
    tags: &[Tag],
    known: &Known,
) -> Result<Option<QuotaPolicy>, ConfigError> {
    let Some(value) = value else { return Ok(None) };
    let raw =
        RawQuotas::deserialize(value).map_err(|e| ConfigError::new("quotas", e.to_string()))?;
    let mut reservation = ReservationPolicy::default();
    if let Some(r) = raw.reservation {
        let positive = |field: &str, v: Option<u64>, current: u64| match v {
            None => Ok(current),
            Some(n) if n > 0 && n <= 10_000_000 => Ok(n),
            Some(_) => Err(ConfigError::new(
                format!("quotas.reservation.{field}"),
                "must be a whole number from 1 to 10000000",
            )),
        };
        reservation.bytes_per_token = positive(
            "bytes_per_token",
            r.bytes_per_token,
            reservation.bytes_per_token,
        )?;
        reservation.default_output_tokens = positive(
            "default_output_tokens",
            r.default_output_tokens,
            reservation.default_output_tokens,
        )?;
        reservation.max_output_tokens = positive(
            "max_output_tokens",
            r.max_output_tokens,
            reservation.max_output_tokens,
        )?;
    }
    let alert_percents = raw.alerts.unwrap_or_else(|| DEFAULT_ALERTS.to_vec());
    if alert_percents.iter().any(|p| *p == 0 || *p > 100)
        || alert_percents.windows(2).any(|w| w[0] >= w[1])
    {
        return Err(ConfigError::new(
            "quotas.alerts",
            "must be ascending percentages from 1 to 100, e.g. [50, 80, 100]",
        ));
    }
    let store = compile_store(raw.store.as_ref())?;
    let known = &Known {
        store: store.as_ref().map(|s| s.on_failure),
        store_lease: store.as_ref().and_then(|s| s.lease_proxies),
        ..*known
    };
    let mut rules: Vec<Rc<LimitRule>> = Vec::with_capacity(raw.limits.len());
    for (i, v) in raw.limits.iter().enumerate() {
        let rule = compile_rule(&format!("quotas.limits[{i}]"), v, tags, known)?;
        if rules.iter().any(|r| r.name == rule.name) {
            return Err(ConfigError::new(
                format!("quotas.limits[{i}].name"),
                format!("{:?} is already the name of another limit", rule.name),
            ));
        }
        rules.push(Rc::new(rule));
    }
    Ok(Some(QuotaPolicy {
        reservation,
        alert_percents,
        rules,
        store,
    }))
}

pub(crate) fn compile_rule(
    at: &str,
    v: &Value,
    tags: &[Tag],
    known: &Known,
) -> Result<LimitRule, ConfigError> {
    let obj = v
        .as_object()
        .ok_or_else(|| ConfigError::new(at, "must be an object"))?;
    let mut limits = Vec::new();
    let mut name = None;
    let mut matcher = None;
    let mut downgrade = None;
    let mut shared = false;
    let mut on_store_failure = None;
    let mut lease = None;
    for (field, value) in obj {
        let fat = format!("{at}.{field}");
        match field.as_str() {
            "shared" => {
                shared = value
                    .as_bool()
                    .ok_or_else(|| ConfigError::new(&fat, "must be true or false"))?;
                if shared && known.store.is_none() {
                    return Err(ConfigError::new(
                        &fat,
                        "a shared rule needs quotas.store (where proxies share counters)",
                    ));
                }
            }
            "on_store_failure" => on_store_failure = Some(FailureMode::parse(&fat, value)?),
            "lease" => lease = Some((fat, value)),
            "name" => {
                let n = value.as_str().filter(|n| {
                    !n.is_empty()
                        && n.len() <= 64
                        && n.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
                });
                name = Some(
                    n.ok_or_else(|| {
                        ConfigError::new(
                            &fat,
                            "must be a name of letters, digits, '-', '_', '.' (at most 64)",
                        )
                    })?
                    .to_string(),
                );
            }
            "match" => {
                let raw = RawMatch::deserialize(value)
                    .map_err(|e| ConfigError::new(&fat, e.to_string()))?;
                matcher = Some(compile_match(&fat, raw, tags, known)?);
            }
            "downgrade" => {
                let raw = RawDowngrade::deserialize(value)
                    .map_err(|e| ConfigError::new(&fat, e.to_string()))?;
                if raw.at_percent == 0 || raw.at_percent > 100 {
                    return Err(ConfigError::new(
                        format!("{fat}.at_percent"),
                        "must be a percentage from 1 to 100",
                    ));
                }
                let mut models = HashMap::with_capacity(raw.models.len());
                for (from, to) in raw.models {
                    for name in [&from, &to] {
                        if (known.model)(name).is_none() {
                            return Err(ConfigError::new(
                                format!("{fat}.models"),
                                format!("{name:?} is not a configured model or route"),
                            ));
                        }
                    }
                    // Asked names are compared by what they denote, so an
                    // alias of a listed model is downgraded as the model.
                    let from = (known.model)(&from).map_or(from, |(_, name)| name);
                    if models.insert(from.clone(), to).is_some() {
                        return Err(ConfigError::new(
                            format!("{fat}.models"),
                            format!("{from:?} is listed twice (by two of its names)"),
                        ));
                    }
                }
                downgrade = Some(Downgrade {
                    at_percent: raw.at_percent,
                    models,
                });
            }
            other => {
                let Some(&(_, meter, window)) = LIMIT_FIELDS.iter().find(|(f, _, _)| *f == other)
                else {
                    let names: Vec<&str> = LIMIT_FIELDS.iter().map(|(f, _, _)| *f).collect();
                    return Err(ConfigError::new(
                        &fat,
                        format!(
                            "unknown field (expected name, match, downgrade, shared, on_store_failure, lease or a limit: {})",
                            names.join(", ")
                        ),
                    ));
                };
                let max = match meter {
                    Meter::MicroUsd => value
                        .as_f64()
                        .filter(|d| d.is_finite() && *d >= 0.0 && *d <= 1e9)
                        .map(|d| (d * 1e6).round() as u64),
                    _ => value.as_u64(),
                }
                .ok_or_else(|| {
                    ConfigError::new(
                        &fat,
                        if meter == Meter::MicroUsd {
                            "must be an amount in dollars from 0 to 1000000000"
                        } else {
                            "must be a whole number"
                        },
                    )
                })?;
                limits.push(Limit { meter, window, max });
            }
        }
    }
    let name = name.ok_or_else(|| ConfigError::new(format!("{at}.name"), "is required"))?;
    if limits.is_empty() {
        return Err(ConfigError::new(
            at,
            "sets no limit (e.g. requests_per_minute, tokens_per_day, usd_per_month)",
        ));
    }
    let (matcher, scope) = matcher.unwrap_or((
        Matcher {
            namespace: Selector::Any,
            service: Selector::Any,
            virtual_key: Selector::Any,
            model: Selector::Any,
            tags: Vec::new(),
        },
        ModelScope::Request,
    ));
    if on_store_failure.is_some() && !shared {
        return Err(ConfigError::new(
            format!("{at}.on_store_failure"),
            "applies only to a shared rule (set shared: true)",
        ));
    }
    let lease = match lease {
        // `lease: false` keeps a shared rule exact under a store-wide default.
        Some((_, Value::Bool(false))) => None,
        None => match known.store_lease.filter(|_| shared) {
            Some(proxies) => Some(crate::quota::lease::compile(
                &format!("{at}.lease"),
                &serde_json::json!({ "proxies": proxies }),
                &limits,
            )?),
            None => None,
        },
        Some((fat, _)) if !shared => {
            return Err(ConfigError::new(
                fat,
                "applies only to a shared rule (set shared: true)",
            ))
        }
        Some((fat, value)) => Some(crate::quota::lease::compile(&fat, value, &limits)?),
    };
    let mut rule = LimitRule {
        name,
        matcher,
        scope,
        limits,
        downgrade,
        static_gauges: Vec::new(),
        shared: match (shared, known.store) {
            (true, Some(default)) => Some(on_store_failure.unwrap_or(default)),
            _ => None,
        },
        lease,
    };
    if let Some(key) = rule.static_bucket() {
        rule.static_gauges = rule.limits.iter().map(|l| rule.gauge(&key, l)).collect();
    }
    Ok(rule)
}

fn compile_match(
    at: &str,
    raw: RawMatch,
    tags: &[Tag],
    known: &Known,
) -> Result<(Matcher, ModelScope), ConfigError> {
    let selector =
        |field: &str, v: Option<String>, check: &dyn Fn(&str) -> bool, what: &str| match v {
            None => Ok(Selector::Any),
            Some(s) if s == "*" => Ok(Selector::Each),
            Some(s) if check(&s) => Ok(Selector::Is(s)),
            Some(s) => Err(ConfigError::new(
                format!("{at}.{field}"),
                format!("{s:?} {what}"),
            )),
        };
    let identity_needed = raw.namespace.is_some() || raw.service.is_some();
    if identity_needed && !known.identity {
        return Err(ConfigError::new(
            at,
            "matching on namespace or service needs an `identity` section (how callers are known)",
        ));
    }
    let namespace = selector(
        "namespace",
        raw.namespace,
        &crate::access::identity::valid_segment,
        "is not a valid namespace",
    )?;
    let service = selector(
        "service",
        raw.service,
        &crate::access::identity::valid_segment,
        "is not a valid service name",
    )?;
    let virtual_key = selector(
        "virtual_key",
        raw.virtual_key,
        known.virtual_key,
        "is not the name of a configured virtual key",
    )?;
    let (model, scope) = match raw.model {
        None => (Selector::Any, ModelScope::Request),
        Some(s) if s == "*" => (Selector::Each, ModelScope::EachModel),
        Some(s) => match (known.model)(&s) {
            Some((Target::Model(i), name)) => (Selector::Is(name), ModelScope::Model(i)),
            Some((Target::Route(j), name)) => (Selector::Is(name), ModelScope::Route(j)),
            None => {
                return Err(ConfigError::new(
                    format!("{at}.model"),
                    format!("{s:?} is not a configured model or route"),
                ))
            }
        },
    };
    let mut wanted = Vec::with_capacity(raw.tags.len());
    for (name, value) in raw.tags {
        let tat = format!("{at}.tags.{name}");
        let index = tags
            .iter()
            .position(|t| t.name == name)
            .ok_or_else(|| ConfigError::new(&tat, "is not a tag named in attribution.tags"))?;
        let value = value
            .as_str()
            .filter(|v| tag_value(v) == *v)
            .ok_or_else(|| {
                ConfigError::new(
                    &tat,
                    "must be one tag value (letters, digits, . _ : -); tags only take exact values",
                )
            })?;
        wanted.push((index, value.to_string()));
    }
    Ok((
        Matcher {
            namespace,
            service,
            virtual_key,
            model,
            tags: wanted,
        },
        scope,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known_ok() -> Known<'static> {
        Known {
            model: &|m| match m {
                "gpt-4o" => Some((Target::Model(0), m.to_string())),
                "gpt-4o-mini" | "mini" => Some((Target::Model(1), "gpt-4o-mini".to_string())),
                "smart" => Some((Target::Route(0), m.to_string())),
                _ => None,
            },
            virtual_key: &|k| k == "ci",
            identity: true,
            store_lease: None,
            store: None,
        }
    }

    fn tags() -> Vec<Tag> {
        compile_attribution(Some(&serde_json::json!({"tags": [
            {"name": "customer", "header": "X-Customer", "metric_values": ["acme"]},
            {"name": "tier", "header": "x-tier"}
        ]})))
        .unwrap()
    }

    fn compile(doc: Value) -> Result<Option<QuotaPolicy>, ConfigError> {
        compile_quotas(Some(&doc), &tags(), &known_ok())
    }

    fn caller(ns: &str, svc: &str) -> Caller {
        Caller {
            namespace: ns.into(),
            service: svc.into(),
            virtual_key: None,
        }
    }

    #[test]
    fn compiles_rules_and_defaults() {
        let p = compile(serde_json::json!({"limits": [
            {"name": "team-a", "match": {"namespace": "team-a"}, "requests_per_minute": 600,
             "usd_per_day": 12.5, "tokens_per_day": 1000000,
             "downgrade": {"at_percent": 80, "models": {"smart": "gpt-4o-mini"}}}
        ]}))
        .unwrap()
        .unwrap();
        assert_eq!(p.reservation, ReservationPolicy::default());
        assert_eq!(p.alert_percents, vec![50, 80, 100]);
        let r = &p.rules[0];
        assert!(r.limits.contains(&Limit {
            meter: Meter::MicroUsd,
            window: Window::Day,
            max: 12_500_000
        }));
        assert!(r.limits.contains(&Limit {
            meter: Meter::Requests,
            window: Window::Minute,
            max: 600
        }));
        assert_eq!(r.limits.len(), 3);
        assert_eq!(r.downgrade.as_ref().unwrap().at_percent, 80);
        assert_eq!(
            r.static_bucket().as_deref(),
            Some("meshllm/quota/v1/team-a")
        );
    }

    #[test]
    fn usage_gauges_name_the_bucket_and_are_ready_for_fixed_buckets() {
        let p = compile(serde_json::json!({"limits": [
            {"name": "shop", "match": {"namespace": "shop"},
             "requests_per_minute": 1, "usd_per_day": 2},
            {"name": "each-svc", "match": {"namespace": "shop", "service": "*"},
             "tokens_per_day": 1}
        ]}))
        .unwrap()
        .unwrap();
        let (fixed, each) = (&p.rules[0], &p.rules[1]);
        let want = |svc: &str, limit: &str, kind: &str, scope: &str| {
            format!(
                "meshllm_budget_used_percent;caller_namespace=shop;caller_service={svc};\
                 limit={limit};kind={kind};scope={scope}"
            )
        };
        assert_eq!(
            fixed.static_gauges,
            [
                want("all", "shop", "requests_per_minute", "all"),
                want("all", "shop", "usd_per_day", "all"),
            ]
        );
        let key = fixed.static_bucket().unwrap();
        assert_eq!(fixed.gauge(&key, &fixed.limits[1]), fixed.static_gauges[1]);
        assert!(each.static_gauges.is_empty(), "the bucket varies by caller");
        let key = each
            .bucket(&Facts {
                caller: Some(&caller("shop", "chat")),
                model: "gpt-4o",
                tags: &[],
            })
            .unwrap();
        assert_eq!(
            each.gauge(&key, &each.limits[0]),
            want("chat", "each-svc", "tokens_per_day", "svc_chat")
        );
    }

    #[test]
    fn buckets_follow_the_match() {
        let p = compile(serde_json::json!({"limits": [
            {"name": "ns", "match": {"namespace": "shop"}, "requests_per_minute": 1},
            {"name": "each-svc", "match": {"namespace": "shop", "service": "*"}, "requests_per_minute": 1},
            {"name": "model", "match": {"service": "chat", "model": "gpt-4o"}, "tokens_per_minute": 1},
            {"name": "free", "match": {"service": "chat", "tags": {"tier": "free"}}, "usd_per_month": 10},
            {"name": "everyone", "requests_per_day": 5},
            {"name": "key", "match": {"virtual_key": "ci"}, "requests_per_day": 5}
        ]}))
        .unwrap()
        .unwrap();
        let chat = caller("shop", "chat");
        let free = vec![(1usize, "free".to_string())];
        type Case<'a> = (
            &'a Caller,
            &'a str,
            &'a [(usize, String)],
            Vec<Option<&'a str>>,
        );
        let cases: Vec<Case> = vec![
            (
                &chat,
                "gpt-4o",
                &free,
                vec![
                    Some("meshllm/quota/v1/ns"),
                    Some("meshllm/quota/v1/each-svc|svc=chat"),
                    Some("meshllm/quota/v1/model"),
                    Some("meshllm/quota/v1/free"),
                    Some("meshllm/quota/v1/everyone"),
                    None,
                ],
            ),
            (
                &chat,
                "gpt-4o-mini",
                &[],
                vec![
                    Some("meshllm/quota/v1/ns"),
                    Some("meshllm/quota/v1/each-svc|svc=chat"),
                    None,
                    None,
                    Some("meshllm/quota/v1/everyone"),
                    None,
                ],
            ),
        ];
        for (c, model, t, want) in cases {
            let facts = Facts {
                caller: Some(c),
                model,
                tags: t,
            };
            let got: Vec<Option<String>> = p.rules.iter().map(|r| r.bucket(&facts)).collect();
            let got: Vec<Option<&str>> = got.iter().map(|o| o.as_deref()).collect();
            assert_eq!(got, want, "{model}");
        }
        let other = caller("other", "chat");
        let facts = Facts {
            caller: Some(&other),
            model: "gpt-4o",
            tags: &[],
        };
        assert_eq!(p.rules[0].bucket(&facts), None);
        assert_eq!(p.rules[1].bucket(&facts), None);
        assert_eq!(p.rules[1].static_bucket(), None);
        let keyed = Caller {
            virtual_key: Some("ci".into()),
            ..caller("ci", "bot")
        };
        let facts = Facts {
            caller: Some(&keyed),
            model: "gpt-4o",
            tags: &[],
        };
        assert_eq!(
            p.rules[5].bucket(&facts).as_deref(),
            Some("meshllm/quota/v1/key")
        );
    }

    #[test]
    fn model_matches_bind_what_the_name_denotes() {
        let p = compile(serde_json::json!({"limits": [
            {"name": "by-alias", "match": {"model": "mini"}, "requests_per_day": 1,
             "downgrade": {"at_percent": 50, "models": {"mini": "gpt-4o"}}},
            {"name": "route", "match": {"model": "smart"}, "requests_per_day": 1},
            {"name": "each", "match": {"namespace": "shop", "model": "*"}, "requests_per_day": 1},
            {"name": "each-svc", "match": {"service": "*", "model": "*"}, "requests_per_day": 1},
            {"name": "all", "requests_per_day": 1}
        ]}))
        .unwrap()
        .unwrap();
        let scopes: Vec<ModelScope> = p.rules.iter().map(|r| r.scope).collect();
        assert_eq!(
            scopes,
            [
                ModelScope::Model(1),
                ModelScope::Route(0),
                ModelScope::EachModel,
                ModelScope::EachModel,
                ModelScope::Request,
            ]
        );
        // An alias is kept as the model's own name, in matches and downgrades.
        assert_eq!(p.rules[0].matcher.model, Selector::Is("gpt-4o-mini".into()));
        let d = p.rules[0].downgrade.as_ref().unwrap();
        assert_eq!(
            d.models.get("gpt-4o-mini").map(String::as_str),
            Some("gpt-4o")
        );
        let chat = caller("shop", "chat");
        let facts = |model| Facts {
            caller: Some(&chat),
            model,
            tags: &[],
        };
        assert!(p.rules[0].bucket(&facts("gpt-4o-mini")).is_some());
        assert_eq!(
            p.rules[2].bucket(&facts("gpt-4o")).as_deref(),
            Some("meshllm/quota/v1/each|model=gpt-4o")
        );
        // Per-model buckets are known in advance unless they also vary by caller.
        let models = ["gpt-4o", "gpt-4o-mini"];
        assert_eq!(
            p.rules[2].known_buckets(models),
            [
                "meshllm/quota/v1/each|model=gpt-4o",
                "meshllm/quota/v1/each|model=gpt-4o-mini"
            ]
        );
        assert!(p.rules[3].known_buckets(models).is_empty());
        assert_eq!(p.rules[4].known_buckets(models), ["meshllm/quota/v1/all"]);
        // Two names of one model in one downgrade list are a mistake.
        let err = compile(serde_json::json!({"limits": [
            {"name": "d", "requests_per_day": 1,
             "downgrade": {"at_percent": 50, "models": {"mini": "gpt-4o", "gpt-4o-mini": "smart"}}}
        ]}))
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("listed twice"), "{err}");
    }

    #[test]
    fn estimates_are_capped() {
        let r = ReservationPolicy::default();
        assert_eq!(r.estimate(4001, Some(100)), (1001, 100));
        assert_eq!(r.estimate(0, None), (0, 1024));
        assert_eq!(r.estimate(8, Some(1_000_000)), (2, 8192));
    }

    #[test]
    fn tag_values_are_sanitised() {
        assert_eq!(tag_value(" acme-1 "), "acme-1");
        assert_eq!(tag_value("a b"), "invalid");
        assert_eq!(tag_value(""), "invalid");
        assert_eq!(tag_value(&"x".repeat(65)), "invalid");
    }

    #[test]
    fn invalid_sections_name_the_field() {
        let cases = [
            (
                serde_json::json!({"limits": [{"match": {}, "requests_per_minute": 1}]}),
                "quotas.limits[0].name: is required",
            ),
            (
                serde_json::json!({"limits": [{"name": "a"}]}),
                "quotas.limits[0]: sets no limit",
            ),
            (
                serde_json::json!({"limits": [{"name": "a", "rpm": 1}]}),
                "quotas.limits[0].rpm: unknown field",
            ),
            (
                serde_json::json!({"limits": [{"name": "a", "requests_per_minute": -1}]}),
                "quotas.limits[0].requests_per_minute: must be a whole number",
            ),
            (
                serde_json::json!({"limits": [{"name": "a", "usd_per_day": "5"}]}),
                "quotas.limits[0].usd_per_day: must be an amount",
            ),
            (
                serde_json::json!({"limits": [{"name": "a", "requests_per_day": 1}, {"name": "a", "requests_per_day": 1}]}),
                "quotas.limits[1].name: \"a\" is already",
            ),
            (
                serde_json::json!({"limits": [{"name": "a", "requests_per_day": 1, "match": {"model": "nope"}}]}),
                "quotas.limits[0].match.model: \"nope\" is not a configured",
            ),
            (
                serde_json::json!({"limits": [{"name": "a", "requests_per_day": 1, "match": {"virtual_key": "x"}}]}),
                "quotas.limits[0].match.virtual_key",
            ),
            (
                serde_json::json!({"limits": [{"name": "a", "requests_per_day": 1, "match": {"tags": {"nope": "x"}}}]}),
                "quotas.limits[0].match.tags.nope: is not a tag",
            ),
            (
                serde_json::json!({"limits": [{"name": "a", "requests_per_day": 1, "match": {"tags": {"tier": "*"}}}]}),
                "quotas.limits[0].match.tags.tier: must be one tag value",
            ),
            (
                serde_json::json!({"limits": [{"name": "a", "requests_per_day": 1, "match": {"namespace": "Bad"}}]}),
                "quotas.limits[0].match.namespace",
            ),
            (
                serde_json::json!({"limits": [{"name": "a", "requests_per_day": 1, "downgrade": {"at_percent": 0, "models": {}}}]}),
                "quotas.limits[0].downgrade.at_percent",
            ),
            (
                serde_json::json!({"limits": [{"name": "a", "requests_per_day": 1, "downgrade": {"at_percent": 50, "models": {"smart": "x"}}}]}),
                "quotas.limits[0].downgrade.models: \"x\"",
            ),
            (
                serde_json::json!({"alerts": [80, 50]}),
                "quotas.alerts: must be ascending",
            ),
            (
                serde_json::json!({"reservation": {"bytes_per_token": 0}}),
                "quotas.reservation.bytes_per_token",
            ),
            (
                serde_json::json!({"limit": []}),
                "quotas: unknown field `limit`",
            ),
        ];
        for (doc, want) in cases {
            let got = compile(doc.clone())
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(got.starts_with(want), "{doc}\n got: {got}\nwant: {want}");
        }
        let no_identity = Known {
            identity: false,
            ..known_ok()
        };
        let doc = serde_json::json!({"limits": [{"name": "a", "requests_per_day": 1, "match": {"namespace": "x"}}]});
        let got = compile_quotas(Some(&doc), &[], &no_identity)
            .err()
            .unwrap()
            .to_string();
        assert!(got.contains("needs an `identity` section"), "{got}");
    }

    #[test]
    fn invalid_attribution_names_the_field() {
        for (doc, want) in [
            (
                serde_json::json!({"tags": [{"name": "a", "header": "bad header"}]}),
                "attribution.tags[0].header",
            ),
            (
                serde_json::json!({"tags": [{"name": "a", "header": "x"}, {"name": "a", "header": "y"}]}),
                "attribution.tags[1].name",
            ),
            (
                serde_json::json!({"tags": [{"name": "a", "header": "x", "metric_values": ["other"]}]}),
                "attribution.tags[0].metric_values[0]",
            ),
        ] {
            let got = compile_attribution(Some(&doc)).err().unwrap().to_string();
            assert!(got.starts_with(want), "{got}");
        }
    }
}
