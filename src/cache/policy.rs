//! The `cache` section, compiled once: how long and how much is kept, who
//! shares answers, which requests may be cached. Namespaces opt in or out
//! with `namespaces.<ns>.cache` (see `config/namespaces.rs`).

use serde::Deserialize;
use serde_json::Value;

use crate::config::error::{deserialize_at, ConfigError};

/// Who sees an answer another caller's request stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Callers of the same namespace (the default): teams never see each
    /// other's answers.
    Namespace,
    /// Only the same service of the same namespace.
    Service,
    /// Every caller of the proxy.
    Mesh,
}

/// `cache`, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// Whether callers whose namespace sets nothing are cached.
    pub default: bool,
    /// Public names (models or routes, after a namespace's aliases) whose
    /// requests are cached; empty: every model.
    pub models: Vec<String>,
    pub ttl_s: u64,
    /// How many answers one proxy keeps at most.
    pub max_entries: u64,
    /// An answer larger than this is not kept.
    pub max_entry_bytes: usize,
    pub scope: Scope,
    /// Cache requests that offer tools (their answers may call them).
    pub tool_turns: bool,
    /// Public names whose requests are cached however they are sampled
    /// (a temperature above 0, or none: Anthropic's API has no sampling
    /// parameters since its 2026-10-21 version); `*` is every model.
    pub sampled: Vec<String>,
    /// Also keep answers in the quota store's Redis (`quotas.store`),
    /// shared by every proxy.
    pub shared: bool,
}

pub const DEFAULT_TTL_S: u64 = 300;
const MAX_TTL_S: u64 = 7 * 24 * 3600;
pub const DEFAULT_MAX_ENTRIES: u64 = 1024;
const MAX_MAX_ENTRIES: u64 = 1 << 20;
pub const DEFAULT_MAX_ENTRY_BYTES: usize = 256 * 1024;
const MAX_MAX_ENTRY_BYTES: usize = 8 << 20;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    #[serde(default)]
    default: Option<bool>,
    #[serde(default)]
    models: Vec<String>,
    #[serde(default)]
    ttl_s: Option<u64>,
    #[serde(default)]
    max_entries: Option<u64>,
    #[serde(default)]
    max_entry_bytes: Option<usize>,
    #[serde(default)]
    scope: Option<Scope>,
    #[serde(default)]
    tool_turns: bool,
    #[serde(default)]
    sampled: Option<Value>,
    #[serde(default)]
    shared: bool,
}

/// Compiles `cache`; `is_model` says whether a public name exists.
pub fn compile_cache(
    value: Option<&Value>,
    is_model: &dyn Fn(&str) -> bool,
) -> Result<Option<CacheConfig>, ConfigError> {
    let Some(value) = value else {
        return Ok(None);
    };
    if !value.is_object() {
        return Err(ConfigError::new("cache", "must be an object"));
    }
    let raw: RawCache = deserialize_at("cache", value)?;
    let ttl_s = raw.ttl_s.unwrap_or(DEFAULT_TTL_S);
    if ttl_s == 0 || ttl_s > MAX_TTL_S {
        return Err(ConfigError::new(
            "cache.ttl_s",
            format!("must be between 1 and {MAX_TTL_S} seconds"),
        ));
    }
    let max_entries = raw.max_entries.unwrap_or(DEFAULT_MAX_ENTRIES);
    if max_entries == 0 || max_entries > MAX_MAX_ENTRIES {
        return Err(ConfigError::new(
            "cache.max_entries",
            format!("must be between 1 and {MAX_MAX_ENTRIES}"),
        ));
    }
    let max_entry_bytes = raw.max_entry_bytes.unwrap_or(DEFAULT_MAX_ENTRY_BYTES);
    if max_entry_bytes == 0 || max_entry_bytes > MAX_MAX_ENTRY_BYTES {
        return Err(ConfigError::new(
            "cache.max_entry_bytes",
            format!("must be between 1 and {MAX_MAX_ENTRY_BYTES}"),
        ));
    }
    for (i, name) in raw.models.iter().enumerate() {
        if !is_model(name) {
            return Err(ConfigError::new(
                format!("cache.models[{i}]"),
                format!("{name:?} is not a model or route of this configuration"),
            ));
        }
    }
    let sampled = match raw.sampled {
        None | Some(Value::Bool(false)) => Vec::new(),
        Some(Value::Bool(true)) => vec!["*".to_string()],
        Some(Value::Array(list)) => {
            let mut out = Vec::with_capacity(list.len());
            for (i, v) in list.iter().enumerate() {
                match v.as_str() {
                    Some(name) if is_model(name) => out.push(name.to_string()),
                    _ => {
                        return Err(ConfigError::new(
                            format!("cache.sampled[{i}]"),
                            format!("{v} is not a model or route of this configuration"),
                        ))
                    }
                }
            }
            out
        }
        Some(_) => {
            return Err(ConfigError::new(
                "cache.sampled",
                "must be true, false or a list of model names",
            ))
        }
    };
    Ok(Some(CacheConfig {
        default: raw.default.unwrap_or(true),
        models: raw.models,
        ttl_s,
        max_entries,
        max_entry_bytes,
        scope: raw.scope.unwrap_or(Scope::Namespace),
        tool_turns: raw.tool_turns,
        sampled,
        shared: raw.shared,
    }))
}

impl CacheConfig {
    /// Whether a caller's requests for `model` (a public name) are cached;
    /// `namespace`: its namespace's own setting, if any.
    pub fn covers(&self, namespace: Option<bool>, model: &str) -> bool {
        namespace.unwrap_or(self.default)
            && (self.models.is_empty() || self.models.iter().any(|m| m == model))
    }

    /// Whether requests for `model` are cached however they are sampled.
    pub fn caches_sampled(&self, model: &str) -> bool {
        self.sampled.iter().any(|m| m == "*" || m == model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn compile(v: Value) -> Result<Option<CacheConfig>, ConfigError> {
        compile_cache(Some(&v), &|n| n == "gpt" || n == "fast")
    }

    #[test]
    fn defaults_cache_every_model_per_namespace() {
        let c = compile(json!({})).unwrap().unwrap();
        assert_eq!(c.ttl_s, DEFAULT_TTL_S);
        assert_eq!(c.scope, Scope::Namespace);
        assert!(c.covers(None, "anything"));
        assert!(!c.covers(Some(false), "anything"));
        assert!(!c.tool_turns && !c.caches_sampled("gpt"));
        assert_eq!(compile_cache(None, &|_| true).unwrap(), None);
    }

    #[test]
    fn opt_in_by_namespace_and_model() {
        let c = compile(json!({"default": false, "models": ["gpt"]}))
            .unwrap()
            .unwrap();
        assert!(!c.covers(None, "gpt"));
        assert!(c.covers(Some(true), "gpt"));
        assert!(!c.covers(Some(true), "fast"));
        let c = compile(json!({"sampled": ["fast"]})).unwrap().unwrap();
        assert!(c.caches_sampled("fast") && !c.caches_sampled("gpt"));
        let c = compile(json!({"sampled": true})).unwrap().unwrap();
        assert!(c.caches_sampled("gpt"));
    }

    #[test]
    fn errors_name_the_field() {
        for (doc, path) in [
            (json!({"ttl_s": 0}), "cache.ttl_s"),
            (json!({"max_entries": 0}), "cache.max_entries"),
            (
                json!({"max_entry_bytes": 1_000_000_000u64}),
                "cache.max_entry_bytes",
            ),
            (json!({"models": ["gpt", "nope"]}), "cache.models[1]"),
            (json!({"sampled": ["gpt", 3]}), "cache.sampled[1]"),
            (json!({"sampled": "yes"}), "cache.sampled"),
            (json!({"scope": "planet"}), "cache"),
            (json!({"tll_s": 3}), "cache"),
            (json!([]), "cache"),
        ] {
            let e = compile(doc.clone()).unwrap_err();
            assert_eq!(e.path, path, "{doc}: {e}");
        }
        let e = compile(json!({"tll_s": 3})).unwrap_err();
        assert!(e.message.contains("tll_s"), "{e}");
    }
}
