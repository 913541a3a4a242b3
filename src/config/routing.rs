//! Routing policy in the configuration: routes (public model names served
//! by several targets under a strategy), each model's routing attributes
//! (price, capabilities, quality), and the failover settings that the
//! filter and the generated Envoy configuration share.
//!
//! Only parsing and validation live here; `routing::route` makes the per-request
//! decisions from what this module compiles.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::Value;

use crate::config::error::ConfigError;
use crate::config::names::valid_model_name;
use crate::core::schema::Schema;
pub use crate::routing::route::{Capabilities, ScoreWeights, Strategy, Tier};

/// Failover across targets, done by Envoy's retries with the filter's
/// upstream half translating each attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failover {
    /// False: a single listener filter serves each request from one target
    /// (installs without an upstream filter).
    pub enabled: bool,
    /// The most targets one request may try; the Envoy configuration has one
    /// position cluster per attempt.
    pub max_attempts: usize,
    /// Time allowed for each attempt to produce response headers.
    pub per_try_timeout_ms: u64,
}

pub const MAX_ATTEMPTS_LIMIT: usize = 8;

impl Default for Failover {
    fn default() -> Self {
        Failover {
            enabled: true,
            max_attempts: 3,
            per_try_timeout_ms: 60_000,
        }
    }
}

/// A model's routing attributes; prices in micro-dollars per million tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelAttributes {
    pub input_price: Option<u64>,
    pub output_price: Option<u64>,
    pub cached_input_price: Option<u64>,
    pub quality: Option<f64>,
    pub caps: Capabilities,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouteTarget {
    /// Index into `Config::models`.
    pub model: usize,
    pub weight: u32,
    pub tier: Tier,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RoutePolicy {
    pub name: String,
    pub strategy: Strategy,
    pub targets: Vec<RouteTarget>,
    /// Data policy: only targets in these regions (None: any).
    pub regions: Option<Vec<String>>,
    /// Data policy: only targets that keep no data.
    pub zero_retention: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFailover {
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default)]
    max_attempts: Option<u64>,
    #[serde(default)]
    per_try_timeout_ms: Option<u64>,
}

pub fn compile_failover(value: Option<&Value>) -> Result<Failover, ConfigError> {
    let mut failover = Failover::default();
    let Some(value) = value else {
        return Ok(failover);
    };
    let raw: RawFailover =
        RawFailover::deserialize(value).map_err(|e| ConfigError::new("failover", e.to_string()))?;
    if let Some(enabled) = raw.enabled {
        failover.enabled = enabled;
    }
    if let Some(n) = raw.max_attempts {
        if n == 0 || n > MAX_ATTEMPTS_LIMIT as u64 {
            return Err(ConfigError::new(
                "failover.max_attempts",
                format!("must be from 1 to {MAX_ATTEMPTS_LIMIT}"),
            ));
        }
        failover.max_attempts = n as usize;
    }
    if let Some(ms) = raw.per_try_timeout_ms {
        if ms == 0 {
            return Err(ConfigError::new(
                "failover.per_try_timeout_ms",
                "must be a positive number of milliseconds",
            ));
        }
        failover.per_try_timeout_ms = ms;
    }
    Ok(failover)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawPrice {
    input: f64,
    output: f64,
    #[serde(default)]
    cached_input: Option<f64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawCapabilities {
    #[serde(default)]
    tools: Option<bool>,
    #[serde(default)]
    vision: Option<bool>,
    #[serde(default)]
    json_mode: Option<bool>,
    #[serde(default)]
    context_window: Option<u64>,
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    zero_retention: Option<bool>,
}

/// Dollars per million tokens to integer micro-dollars per million tokens.
fn micro_dollars(at: &str, dollars: f64) -> Result<u64, ConfigError> {
    if !dollars.is_finite() || !(0.0..=1_000_000.0).contains(&dollars) {
        return Err(ConfigError::new(
            at,
            "must be a price in dollars per million tokens, from 0 to 1000000",
        ));
    }
    Ok((dollars * 1_000_000.0).round() as u64)
}

/// A model's attributes from its optional `price`, `capabilities` and
/// `quality`. Unstated capabilities default to what the gateway can
/// translate for the provider's API (JSON mode is refused for Anthropic and
/// Bedrock models).
pub fn compile_attributes(
    at: &str,
    schema: Schema,
    price: Option<&RawPrice>,
    caps: Option<&RawCapabilities>,
    quality: Option<f64>,
) -> Result<ModelAttributes, ConfigError> {
    let (input_price, output_price, cached_input_price) = match price {
        None => (None, None, None),
        Some(p) => (
            Some(micro_dollars(&format!("{at}.price.input"), p.input)?),
            Some(micro_dollars(&format!("{at}.price.output"), p.output)?),
            match p.cached_input {
                Some(c) => Some(micro_dollars(&format!("{at}.price.cached_input"), c)?),
                None => None,
            },
        ),
    };
    if let Some(q) = quality {
        if !(0.0..=1.0).contains(&q) {
            return Err(ConfigError::new(
                format!("{at}.quality"),
                "must be a score from 0 to 1",
            ));
        }
    }
    let default_json = matches!(schema, Schema::OpenAi | Schema::Gemini);
    let empty = RawCapabilities::default();
    let c = caps.unwrap_or(&empty);
    if c.context_window == Some(0) {
        return Err(ConfigError::new(
            format!("{at}.capabilities.context_window"),
            "must be a positive number of tokens",
        ));
    }
    Ok(ModelAttributes {
        input_price,
        output_price,
        cached_input_price,
        quality,
        caps: Capabilities {
            tools: c.tools.unwrap_or(true),
            vision: c.vision.unwrap_or(true),
            json_mode: c.json_mode.unwrap_or(default_json),
            context_window: c.context_window,
            region: c.region.clone(),
            zero_retention: c.zero_retention.unwrap_or(false),
        },
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: String,
    #[serde(default)]
    strategy: Option<String>,
    targets: Vec<RawTarget>,
    #[serde(default)]
    score_weights: Option<RawScoreWeights>,
    #[serde(default)]
    regions: Option<Vec<String>>,
    #[serde(default)]
    zero_retention: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawTarget {
    Name(String),
    Detailed(RawDetailedTarget),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDetailedTarget {
    model: String,
    #[serde(default)]
    weight: Option<u32>,
    #[serde(default)]
    tier: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScoreWeights {
    #[serde(default)]
    price: f64,
    #[serde(default)]
    latency: f64,
    #[serde(default)]
    quality: f64,
}

const STRATEGIES: &str = "ordered, weighted, lowest_cost, lowest_latency, scored, auto";

/// Compiles `routes`. Route names share one namespace with model names and
/// aliases (`model_names`); targets name models, not other routes.
pub fn compile_routes(
    value: Option<&Value>,
    model_names: &HashMap<String, usize>,
) -> Result<Vec<RoutePolicy>, ConfigError> {
    let list = match value {
        None => return Ok(Vec::new()),
        Some(Value::Array(list)) => list,
        Some(_) => return Err(ConfigError::new("routes", "must be an array")),
    };
    let mut routes: Vec<RoutePolicy> = Vec::with_capacity(list.len());
    for (i, v) in list.iter().enumerate() {
        let at = format!("routes[{i}]");
        let raw = RawRoute::deserialize(v).map_err(|e| ConfigError::new(&at, e.to_string()))?;
        if !valid_model_name(&raw.name) {
            return Err(ConfigError::new(
                format!("{at}.name"),
                format!("{:?} is not a valid model name", raw.name),
            ));
        }
        if model_names.contains_key(&raw.name) || routes.iter().any(|r| r.name == raw.name) {
            return Err(ConfigError::new(
                format!("{at}.name"),
                format!("model name {:?} is already used by another entry", raw.name),
            ));
        }
        let strategy = match raw.strategy.as_deref().unwrap_or("ordered") {
            "ordered" => Strategy::Ordered,
            "weighted" => Strategy::Weighted,
            "lowest_cost" => Strategy::LowestCost,
            "lowest_latency" => Strategy::LowestLatency,
            "auto" => Strategy::Auto,
            "scored" => {
                let w = raw.score_weights.as_ref().ok_or_else(|| {
                    ConfigError::new(
                        format!("{at}.score_weights"),
                        "is required by the scored strategy (price, latency, quality)",
                    )
                })?;
                let all = [w.price, w.latency, w.quality];
                if all.iter().any(|x| !x.is_finite() || *x < 0.0) || all.iter().sum::<f64>() == 0.0
                {
                    return Err(ConfigError::new(
                        format!("{at}.score_weights"),
                        "weights must be non-negative numbers, not all zero",
                    ));
                }
                Strategy::Scored(ScoreWeights {
                    price: w.price,
                    latency: w.latency,
                    quality: w.quality,
                })
            }
            other => {
                return Err(ConfigError::new(
                    format!("{at}.strategy"),
                    format!("unknown strategy {other:?} (expected one of: {STRATEGIES})"),
                ))
            }
        };
        if raw.score_weights.is_some() && !matches!(strategy, Strategy::Scored(_)) {
            return Err(ConfigError::new(
                format!("{at}.score_weights"),
                "only applies to the scored strategy",
            ));
        }
        if raw.targets.is_empty() {
            return Err(ConfigError::new(
                format!("{at}.targets"),
                "at least one target is required",
            ));
        }
        let mut targets = Vec::with_capacity(raw.targets.len());
        for (j, t) in raw.targets.iter().enumerate() {
            let tat = format!("{at}.targets[{j}]");
            let (name, weight, tier) = match t {
                RawTarget::Name(n) => (n.as_str(), None, None),
                RawTarget::Detailed(d) => (d.model.as_str(), d.weight, d.tier.as_deref()),
            };
            let model = *model_names.get(name).ok_or_else(|| {
                ConfigError::new(
                    tat.clone(),
                    format!("unknown model {name:?} (targets name entries of `models`)"),
                )
            })?;
            if targets.iter().any(|x: &RouteTarget| x.model == model) {
                return Err(ConfigError::new(
                    tat,
                    format!("model {name:?} is listed twice"),
                ));
            }
            if weight.is_some() && strategy != Strategy::Weighted {
                return Err(ConfigError::new(
                    format!("{tat}.weight"),
                    "only applies to the weighted strategy",
                ));
            }
            let tier = match (tier, strategy) {
                (None, Strategy::Auto) => {
                    return Err(ConfigError::new(
                        format!("{tat}.tier"),
                        "the auto strategy needs each target's tier: \"simple\" or \"hard\"",
                    ))
                }
                (None, _) => Tier::Any,
                (Some(_), s) if s != Strategy::Auto => {
                    return Err(ConfigError::new(
                        format!("{tat}.tier"),
                        "only applies to the auto strategy",
                    ))
                }
                (Some("simple"), _) => Tier::Simple,
                (Some("hard"), _) => Tier::Hard,
                (Some(other), _) => {
                    return Err(ConfigError::new(
                        format!("{tat}.tier"),
                        format!("unknown tier {other:?} (expected simple or hard)"),
                    ))
                }
            };
            targets.push(RouteTarget {
                model,
                weight: weight.unwrap_or(1),
                tier,
            });
        }
        if strategy == Strategy::Weighted && targets.iter().all(|t| t.weight == 0) {
            return Err(ConfigError::new(
                format!("{at}.targets"),
                "at least one target needs a positive weight",
            ));
        }
        if strategy == Strategy::Auto {
            for tier in [Tier::Simple, Tier::Hard] {
                if !targets.iter().any(|t| t.tier == tier) {
                    return Err(ConfigError::new(
                        format!("{at}.targets"),
                        "the auto strategy needs at least one simple and one hard target",
                    ));
                }
            }
        }
        routes.push(RoutePolicy {
            name: raw.name,
            strategy,
            targets,
            regions: raw.regions,
            zero_retention: raw.zero_retention,
        });
    }
    Ok(routes)
}

#[cfg(test)]
mod tests {
    use crate::config::testing::{compile_doc, compile_error, config};

    fn compile_err(extra: &str) -> String {
        let doc = format!(
            r#"{{"providers":[{{"name":"a","kind":"openai"}},{{"name":"b","kind":"anthropic"}}],
            "models":[{{"name":"m","provider":"a","price":{{"input":1,"output":2}}}},
                      {{"name":"n","provider":"b"}}]{extra}}}"#
        );
        compile_doc(&doc).map_or_else(|e| e, |_| "ok".into())
    }

    #[test]
    fn routing_configuration_errors_name_the_field() {
        let cases = [
            (r#","routes":[{"name":"r","targets":["m","n"]}]"#, "ok"),
            (r#","routes":[{"name":"m","targets":["n"]}]"#, "routes[0].name: model name \"m\" is already used"),
            (r#","routes":[{"name":"r","targets":[]}]"#, "routes[0].targets: at least one target is required"),
            (r#","routes":[{"name":"r","targets":["x"]}]"#, "routes[0].targets[0]: unknown model \"x\""),
            (r#","routes":[{"name":"r","targets":["m","m"]}]"#, "routes[0].targets[1]: model \"m\" is listed twice"),
            (r#","routes":[{"name":"r","strategy":"fastest","targets":["m"]}]"#, "routes[0].strategy: unknown strategy \"fastest\""),
            (r#","routes":[{"name":"r","targets":[{"model":"m","weight":2}]}]"#, "routes[0].targets[0].weight: only applies to the weighted strategy"),
            (r#","routes":[{"name":"r","strategy":"weighted","targets":[{"model":"m","weight":0}]}]"#, "routes[0].targets: at least one target needs a positive weight"),
            (r#","routes":[{"name":"r","strategy":"auto","targets":["m","n"]}]"#, "routes[0].targets[0].tier: the auto strategy needs each target's tier"),
            (r#","routes":[{"name":"r","strategy":"auto","targets":[{"model":"m","tier":"simple"}]}]"#, "routes[0].targets: the auto strategy needs at least one simple and one hard target"),
            (r#","routes":[{"name":"r","strategy":"scored","targets":["m"]}]"#, "routes[0].score_weights: is required by the scored strategy"),
            (r#","routes":[{"name":"r","strategy":"scored","score_weights":{"price":0},"targets":["m"]}]"#, "routes[0].score_weights: weights must be non-negative numbers, not all zero"),
            (r#","failover":{"max_attempts":9}"#, "failover.max_attempts: must be from 1 to 8"),
            (r#","failover":{"per_try_timeout_ms":0}"#, "failover.per_try_timeout_ms: must be a positive"),
            (r#","failover":{"retries":2}"#, "failover: unknown field `retries`"),
        ];
        for (extra, want) in cases {
            let got = compile_err(extra);
            assert!(got.starts_with(want), "{extra}\n got: {got}\nwant: {want}");
        }
    }

    #[test]
    fn model_attributes_compile_to_micro_dollars_and_defaults() {
        let doc = r#"{"providers":[{"name":"a","kind":"openai"},{"name":"b","kind":"anthropic"}],
            "models":[{"name":"m","provider":"a","price":{"input":2.5,"output":10,"cached_input":1.25},
                       "capabilities":{"vision":false,"context_window":128000},"quality":0.8},
                      {"name":"n","provider":"b"}]}"#;
        let c = config(doc);
        let m = &c.models[0].attributes;
        assert_eq!(m.input_price, Some(2_500_000));
        assert_eq!(m.output_price, Some(10_000_000));
        assert_eq!(m.cached_input_price, Some(1_250_000));
        assert!(!m.caps.vision && m.caps.tools && m.caps.json_mode);
        assert_eq!(m.caps.context_window, Some(128_000));
        // Anthropic models cannot do JSON mode through the gateway.
        assert!(!c.models[1].attributes.caps.json_mode);
        let bad = r#"{"providers":[{"name":"a","kind":"openai"}],
            "models":[{"name":"m","provider":"a","quality":2}]}"#;
        let e = compile_error(bad);
        assert!(
            e.starts_with("models[0].quality: must be a score from 0 to 1"),
            "{e}"
        );
    }
}
