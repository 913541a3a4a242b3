//! Plugin configuration: one JSON document, validated and compiled once.
//!
//! `compile` turns the document into the runtime `Config` the request path
//! reads: providers with their precomputed authority, paths and auth header,
//! and a model table keyed by every public name and alias. Any problem is
//! reported with the field path it concerns, and nothing is half-applied.
//!
//! One file per section: `providers`, `models`, `routing` (`routes`,
//! `failover` and each model's routing attributes), `namespaces`; the
//! `identity`, `attribution` and `quotas` sections compile next to the code
//! that uses them (`access::identity`, `quota::limits`). Every section
//! reports through `error` and checks names with `names`, two leaves, so no
//! section imports this module.

pub mod error;
pub mod models;
pub mod names;
pub mod namespaces;
pub mod operations;
pub mod providers;
pub mod routing;
#[cfg(test)]
pub mod testing;

use std::collections::{HashMap, HashSet};
use std::rc::Rc;

use serde_json::{Map, Value};

use crate::access::identity::{compile_identity, IdentityPolicy};
use crate::cache::policy::{compile_cache, CacheConfig};
use crate::config::error::ConfigError;
use crate::config::models::{compile_models, model_listing, ModelRoute};
use crate::config::names::Target;
use crate::config::namespaces::{
    compile_allowed, compile_namespaces, Document, ListenerCache, NamespacePolicy,
};
use crate::config::providers::{attempt_header_names, compile_providers, Provider};
use crate::config::routing::{compile_failover, compile_routes, Failover, RoutePolicy};
use crate::guard::policy::{compile_guardrails, Guardrails};
use crate::quota::limits::{compile_attribution, compile_quotas, Known, QuotaPolicy, Tag};

pub const DEFAULT_MAX_REQUEST_BYTES: usize = 10 * 1024 * 1024;
const MAX_MAX_REQUEST_BYTES: usize = 64 * 1024 * 1024;
/// The largest answer the filter holds whole (a translated non-streamed
/// answer, or an error reply it rewrites): images in answers run to a few
/// MiB each, long texts to hundreds of KiB.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;
const MAX_MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug)]
pub struct Config {
    pub providers: Vec<Provider>,
    pub models: Vec<ModelRoute>,
    by_name: HashMap<String, usize>,
    pub max_request_bytes: usize,
    /// The most answer bytes the filter buffers (translated non-streamed
    /// answers and error replies); larger ones get 502 `response_too_large`.
    pub max_response_bytes: usize,
    /// Public names served by several targets under a strategy.
    pub routes: Vec<RoutePolicy>,
    route_by_name: HashMap<String, usize>,
    pub failover: Failover,
    /// Every header name a provider attempt may set (credentials, fixed
    /// headers, signatures): a retry to another provider clears them first.
    pub attempt_header_names: Vec<String>,
    /// How callers are identified; None when not configured.
    pub identity: Option<IdentityPolicy>,
    /// Attribution tags read from request headers.
    pub tags: Vec<Tag>,
    /// Quotas and budgets; None when not configured.
    pub quotas: Option<QuotaPolicy>,
    /// The hosts whose requests the filter handles (lowercase, no port; a
    /// leading `*.` matches any subdomain); empty: every request. In a
    /// sidecar the outbound listener carries all of a pod's HTTP traffic.
    pub hosts: Vec<String>,
    /// The `GET /v1/models` answer, built once.
    pub models_list_body: Vec<u8>,
    /// `GET /v1/models/{id}` answers, built once.
    model_bodies: HashMap<String, Vec<u8>>,
    /// The mesh allow-list (`allowed_models`); None: every public name.
    pub allowed_models: Option<HashSet<Target>>,
    /// Namespace policies of the document, by namespace.
    pub namespaces: HashMap<String, Rc<NamespacePolicy>>,
    /// Namespace policies from listener metadata, compiled once per value.
    pub listener_policies: ListenerCache,
    /// The provider that serves calls naming no model (files, batches,
    /// stored responses): `default_provider`, else the first of kind
    /// openai or azure_openai. An index into `providers`.
    pub account_provider: Option<usize>,
    /// Guardrail rules, and those callers get by default.
    pub guardrails: Guardrails,
    /// `cache`: None when answers are never cached.
    pub cache: Option<CacheConfig>,
}

impl Config {
    /// Whether the filter handles a request for `authority` (`host[:port]`).
    pub fn handles_host(&self, authority: &str) -> bool {
        if self.hosts.is_empty() {
            return true;
        }
        // An IPv6 literal keeps its brackets; only a trailing `:port` goes.
        let host = match authority.rsplit_once(':') {
            Some((h, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => authority,
        };
        let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
        self.hosts.iter().any(|want| match want.strip_prefix("*.") {
            Some(suffix) => host
                .strip_suffix(suffix)
                .is_some_and(|rest| rest.len() > 1 && rest.ends_with('.')),
            None => *want == host,
        })
    }

    /// The route for a public model name or alias.
    pub fn route(&self, model: &str) -> Option<&ModelRoute> {
        self.route_index(model).map(|i| &self.models[i])
    }

    pub fn route_index(&self, model: &str) -> Option<usize> {
        self.by_name.get(model).copied()
    }

    pub fn routing_index(&self, name: &str) -> Option<usize> {
        self.route_by_name.get(name).copied()
    }

    /// The shared quota store, when one is configured.
    pub fn store(&self) -> Option<&crate::quota::store::StoreConfig> {
        self.quotas.as_ref().and_then(|q| q.store.as_ref())
    }

    pub fn model_body(&self, id: &str) -> Option<&[u8]> {
        self.model_bodies.get(id).map(Vec::as_slice)
    }

    /// What a public name (model, model alias or route) denotes.
    pub fn target(&self, name: &str) -> Option<Target> {
        self.route_index(name)
            .map(Target::Model)
            .or_else(|| self.routing_index(name).map(Target::Route))
    }

    /// The document's own name of what a public name denotes: a model's
    /// name (not an alias), or a route's.
    pub fn target_name(&self, target: Target) -> &str {
        match target {
            Target::Model(i) => self.models.get(i).map_or("", |m| m.name.as_str()),
            Target::Route(j) => self.routes.get(j).map_or("", |r| r.name.as_str()),
        }
    }

    /// Every public name with what it denotes, in listing order.
    pub fn public_targets(&self) -> impl Iterator<Item = (&str, Target)> {
        self.models
            .iter()
            .enumerate()
            .flat_map(|(i, m)| m.public_names().map(move |n| (n, Target::Model(i))))
            .chain(
                self.routes
                    .iter()
                    .enumerate()
                    .map(|(j, r)| (r.name.as_str(), Target::Route(j))),
            )
    }

    /// `owned_by` in listings: the provider of a model, `meshllm` for routes.
    pub fn owner(&self, target: Target) -> &str {
        match target {
            Target::Model(i) => self
                .models
                .get(i)
                .and_then(|m| self.providers.get(m.provider))
                .map_or("meshllm", |p| p.name.as_str()),
            Target::Route(_) => "meshllm",
        }
    }

    /// Every public name and alias, in configuration order, then routes.
    pub fn public_names(&self) -> impl Iterator<Item = &str> {
        self.models
            .iter()
            .flat_map(ModelRoute::public_names)
            .chain(self.routes.iter().map(|r| r.name.as_str()))
    }
}

impl Document for Config {
    fn target(&self, name: &str) -> Option<Target> {
        Config::target(self, name)
    }
    fn target_name(&self, target: Target) -> &str {
        Config::target_name(self, target)
    }
    fn identity(&self) -> Option<&IdentityPolicy> {
        self.identity.as_ref()
    }
    fn tags(&self) -> &[Tag] {
        &self.tags
    }
    fn store_failure(&self) -> Option<crate::quota::store::FailureMode> {
        self.store().map(|s| s.on_failure)
    }
    fn store_lease(&self) -> Option<u64> {
        self.store().and_then(|s| s.lease_proxies)
    }
    fn guardrail(&self, name: &str) -> Option<usize> {
        self.guardrails.index(name)
    }
}

#[derive(Debug)]
pub struct Compiled {
    pub config: Config,
    /// Problems worth a log line that do not stop the filter.
    pub warnings: Vec<String>,
}

const TOP_LEVEL_FIELDS: &[&str] = &[
    "providers",
    "models",
    "routes",
    "failover",
    "max_request_bytes",
    "max_response_bytes",
    "identity",
    "attribution",
    "quotas",
    "hosts",
    "allowed_models",
    "namespaces",
    "default_provider",
    "guardrails",
    "cache",
];

/// Parses, validates and compiles a plugin configuration document.
/// `env` looks up environment variables (the proxy's, in the VM).
pub fn compile(doc: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Compiled, ConfigError> {
    let root: Value = serde_json::from_slice(doc)
        .map_err(|e| ConfigError::new("", format!("configuration is not valid JSON: {e}")))?;
    let obj: &Map<String, Value> = root
        .as_object()
        .ok_or_else(|| ConfigError::new("", "configuration must be a JSON object"))?;
    for key in obj.keys() {
        if !TOP_LEVEL_FIELDS.contains(&key.as_str()) {
            return Err(ConfigError::new(
                key.as_str(),
                format!(
                    "unknown field (expected one of: {})",
                    TOP_LEVEL_FIELDS.join(", ")
                ),
            ));
        }
    }

    let max_request_bytes = byte_limit(
        obj.get("max_request_bytes"),
        "max_request_bytes",
        DEFAULT_MAX_REQUEST_BYTES,
        MAX_MAX_REQUEST_BYTES,
    )?;
    let max_response_bytes = byte_limit(
        obj.get("max_response_bytes"),
        "max_response_bytes",
        DEFAULT_MAX_RESPONSE_BYTES,
        MAX_MAX_RESPONSE_BYTES,
    )?;

    let mut warnings = Vec::new();
    let providers = compile_providers(obj.get("providers"), env, &mut warnings)?;
    let (models, by_name) = compile_models(obj.get("models"), &providers)?;

    let routes = compile_routes(obj.get("routes"), &by_name)?;
    let route_by_name: HashMap<String, usize> = routes
        .iter()
        .enumerate()
        .map(|(i, r)| (r.name.clone(), i))
        .collect();
    let failover = compile_failover(obj.get("failover"))?;
    let identity = compile_identity(obj.get("identity"))?;
    let tags = compile_attribution(obj.get("attribution"))?;
    let is_model = |name: &str| {
        let model = by_name
            .get(name)
            .map(|&i| (Target::Model(i), models[i].name.clone()));
        model.or_else(|| {
            let j = *route_by_name.get(name)?;
            Some((Target::Route(j), routes[j].name.clone()))
        })
    };
    let is_key = |name: &str| identity.as_ref().is_some_and(|i| i.has_key(name));
    let known = Known {
        model: &is_model,
        virtual_key: &is_key,
        identity: identity.is_some(),
        store: None,
        store_lease: None,
    };
    let quotas = compile_quotas(obj.get("quotas"), &tags, &known)?;
    let hosts = compile_hosts(obj.get("hosts"))?;
    let account_provider = compile_account_provider(obj.get("default_provider"), &providers)?;
    let guardrails = compile_guardrails(obj.get("guardrails"))?;
    let cache = compile_cache(obj.get("cache"), &|n| is_model(n).is_some())?;
    if cache.as_ref().is_some_and(|c| c.shared)
        && quotas.as_ref().and_then(|q| q.store.as_ref()).is_none()
    {
        return Err(ConfigError::new(
            "cache.shared",
            "needs the shared store of `quotas.store`, where answers are shared",
        ));
    }
    let attempt_header_names = attempt_header_names(&providers);
    let (models_list_body, model_bodies) = model_listing(&models, &providers, &routes);
    let mut config = Config {
        providers,
        models,
        by_name,
        max_request_bytes,
        max_response_bytes,
        routes,
        route_by_name,
        failover,
        attempt_header_names,
        identity,
        tags,
        quotas,
        hosts,
        models_list_body,
        model_bodies,
        allowed_models: None,
        namespaces: HashMap::new(),
        listener_policies: ListenerCache::default(),
        account_provider,
        guardrails,
        cache,
    };
    // Allow-lists and namespace aliases name the document's public names.
    if let Some(v) = obj.get("allowed_models") {
        config.allowed_models = Some(compile_allowed("allowed_models", v, &|n| config.target(n))?);
    }
    config.namespaces = compile_namespaces(obj.get("namespaces"), &config)?;
    Ok(Compiled { config, warnings })
}

/// `default_provider`: a provider of kind openai or azure_openai, by name.
fn compile_account_provider(
    value: Option<&Value>,
    providers: &[Provider],
) -> Result<Option<usize>, ConfigError> {
    use crate::providers::ProviderKind;
    let serves = |p: &Provider| matches!(p.kind, ProviderKind::OpenAi | ProviderKind::AzureOpenAi);
    let Some(value) = value else {
        return Ok(providers.iter().position(serves));
    };
    let name = value
        .as_str()
        .ok_or_else(|| ConfigError::new("default_provider", "must be a provider's name"))?;
    match providers.iter().position(|p| p.name == name) {
        Some(i) if serves(&providers[i]) => Ok(Some(i)),
        Some(_) => Err(ConfigError::new(
            "default_provider",
            format!("provider {name:?} is not of kind openai or azure_openai"),
        )),
        None => Err(ConfigError::new(
            "default_provider",
            format!("no provider is named {name:?}"),
        )),
    }
}

/// A size limit in bytes: `default` when absent, else 1 ..= `max`.
fn byte_limit(
    value: Option<&Value>,
    field: &str,
    default: usize,
    max: usize,
) -> Result<usize, ConfigError> {
    let Some(value) = value else {
        return Ok(default);
    };
    value
        .as_u64()
        .filter(|n| (1..=max as u64).contains(n))
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| ConfigError::new(field, format!("must be a whole number from 1 to {max}")))
}

/// `hosts`: the request hosts the filter handles.
fn compile_hosts(value: Option<&Value>) -> Result<Vec<String>, ConfigError> {
    let Some(value) = value else {
        return Ok(Vec::new());
    };
    let list = value
        .as_array()
        .filter(|l| !l.is_empty())
        .ok_or_else(|| ConfigError::new("hosts", "must be a non-empty list of host names"))?;
    let mut hosts = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        let path = format!("hosts[{i}]");
        let name = item
            .as_str()
            .ok_or_else(|| ConfigError::new(&path, "must be a host name string"))?;
        let bare = name.strip_prefix("*.").unwrap_or(name);
        let valid = !bare.is_empty()
            && bare.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !valid {
            return Err(ConfigError::new(
                &path,
                format!(
                    "{name:?} is not a host name (letters, digits, '-' and '.', \
                     optionally starting with \"*.\"; no port or scheme)"
                ),
            ));
        }
        let name = name.to_ascii_lowercase();
        if hosts.contains(&name) {
            return Err(ConfigError::new(&path, format!("{name:?} is listed twice")));
        }
        hosts.push(name);
    }
    Ok(hosts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::{compile_error, compiled, test_env};
    use crate::core::schema::Schema;

    const GOOD: &str = r#"{
      "providers": [
        {"name": "openai", "kind": "openai", "api_key_env": "OPENAI_API_KEY"},
        {"name": "azure", "kind": "azure_openai", "base_url": "https://res.openai.azure.com",
         "api_version": "2024-10-21", "api_key_env": "AZURE_KEY"},
        {"name": "groq", "kind": "openai_compatible", "base_url": "https://api.groq.com/openai/v1/",
         "api_key_env": "NOKEY_API_KEY", "headers": {"X-Title": "meshllm"}},
        {"name": "ollama", "kind": "openai_compatible", "base_url": "http://ollama.local:11434/v1",
         "cluster": "ollama_local"}
      ],
      "models": [
        {"name": "gpt-4o-mini", "provider": "openai", "aliases": ["mini"]},
        {"name": "gpt-4o", "provider": "azure", "deployment": "gpt4o-prod"},
        {"name": "fast", "provider": "groq", "model": "llama-3.1-8b-instant"},
        {"name": "local", "provider": "ollama", "model": "llama3.2"}
      ],
      "max_request_bytes": 1048576
    }"#;

    #[test]
    fn compiles_a_complete_document() {
        let c = compiled(GOOD);
        let cfg = &c.config;
        assert_eq!(cfg.max_request_bytes, 1048576);
        assert_eq!(cfg.max_response_bytes, DEFAULT_MAX_RESPONSE_BYTES);

        let openai = &cfg.providers[0];
        assert_eq!(openai.authority, "api.openai.com");
        assert_eq!(openai.cluster, "openai");
        assert_eq!(
            openai.auth_header,
            Some(("authorization", "Bearer sk-test-openai".to_string()))
        );
        let mini = cfg.route("mini").unwrap();
        assert_eq!(mini.name, "gpt-4o-mini");
        assert_eq!(mini.upstream_model_json, "\"gpt-4o-mini\"");
        assert_eq!(mini.chat_path, "/v1/chat/completions");
        assert_eq!(mini.embeddings_path.as_deref(), Some("/v1/embeddings"));
        assert_eq!(mini.responses_path.as_deref(), Some("/v1/responses"));
        assert_eq!(mini.schema_for(Schema::Responses), Schema::Responses);
        assert_eq!(mini.schema_for(Schema::OpenAi), Schema::OpenAi);

        let azure = cfg.route("gpt-4o").unwrap();
        assert_eq!(
            azure.chat_path,
            "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21"
        );
        assert_eq!(
            cfg.providers[1].auth_header,
            Some(("api-key", "az-test-secret".to_string()))
        );

        // Azure's v1 Responses API names the deployment in the body.
        assert_eq!(
            azure.responses_path.as_deref(),
            Some("/openai/v1/responses")
        );
        assert_eq!(azure.responses_model_json, "\"gpt4o-prod\"");

        let fast = cfg.route("fast").unwrap();
        assert_eq!(fast.upstream_model, "llama-3.1-8b-instant");
        // OpenAI-compatible servers get the chat pivot.
        assert_eq!(fast.responses_path, None);
        assert_eq!(fast.schema_for(Schema::Responses), Schema::OpenAi);
        assert_eq!(fast.chat_path, "/openai/v1/chat/completions");
        assert_eq!(cfg.providers[2].authority, "api.groq.com");
        assert_eq!(
            cfg.providers[2].extra_headers,
            vec![("x-title".to_string(), "meshllm".to_string())]
        );
        // Missing key: warned, not fatal; no auth header.
        assert!(cfg.providers[2].key_missing);
        assert!(cfg.providers[2].auth_header.is_none());
        assert_eq!(c.warnings.len(), 1);
        assert!(c.warnings[0].contains("NOKEY_API_KEY"));
        assert!(!c.warnings[0].contains("sk-"));

        let local = &cfg.providers[3];
        assert_eq!(local.authority, "ollama.local:11434");
        assert_eq!(local.cluster, "ollama_local");
        assert!(!local.key_missing);
        assert!(local.auth_header.is_none());

        assert!(cfg.route("llama3.2").is_none());
        let names: Vec<&str> = cfg.public_names().collect();
        assert_eq!(names, ["gpt-4o-mini", "mini", "gpt-4o", "fast", "local"]);
    }

    #[test]
    fn models_listing_is_openai_shaped() {
        let c = compiled(GOOD);
        let v: Value = serde_json::from_slice(&c.config.models_list_body).unwrap();
        assert_eq!(v["object"], "list");
        let ids: Vec<&str> = v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["gpt-4o-mini", "mini", "gpt-4o", "fast", "local"]);
        assert_eq!(v["data"][0]["object"], "model");
        assert_eq!(v["data"][0]["owned_by"], "openai");
        let one: Value = serde_json::from_slice(c.config.model_body("fast").unwrap()).unwrap();
        assert_eq!(one["id"], "fast");
        assert_eq!(one["owned_by"], "groq");
        // No secret ends up in any listing.
        let all = String::from_utf8(c.config.models_list_body.clone()).unwrap();
        assert!(!all.contains("sk-test") && !all.contains("az-test-secret"));
    }

    #[test]
    fn blank_key_counts_as_missing() {
        let c = compiled(
            r#"{"providers":[{"name":"o","kind":"openai","api_key_env":"EMPTY"}],
                      "models":[{"name":"m","provider":"o"}]}"#,
        );
        assert!(c.config.providers[0].key_missing);
    }

    #[test]
    fn invalid_documents_name_the_field() {
        let cases: &[(&str, &str)] = &[
            ("[]", "configuration must be a JSON object"),
            ("{", "configuration is not valid JSON"),
            (r#"{"providerz":[]}"#, "providerz: unknown field"),
            (
                r#"{"models":[]}"#,
                "providers: at least one provider is required",
            ),
            (r#"{"providers":{}}"#, "providers: must be an array"),
            (
                r#"{"providers":[{"name":"a","kind":"anthropc"}],"models":[]}"#,
                "providers[0].kind: unknown provider kind \"anthropc\"",
            ),
            (
                r#"{"providers":[{"name":"a","kind":"openai","kin":"x"}]}"#,
                "providers[0]: unknown field `kin`",
            ),
            (
                r#"{"providers":[{"name":"a","kind":"openai_compatible"}]}"#,
                "providers[0].base_url: required",
            ),
            (
                r#"{"providers":[{"name":"a","kind":"openai","base_url":"ftp://x"}]}"#,
                "providers[0].base_url: \"ftp://x\" must start with https:// or http://",
            ),
            (
                r#"{"providers":[{"name":"a","kind":"openai","base_url":"https://x:99999"}]}"#,
                "providers[0].base_url: \"https://x:99999\" has an invalid port",
            ),
            (
                r#"{"providers":[{"name":"a","kind":"azure_openai","base_url":"https://x"}]}"#,
                "providers[0].api_version: required",
            ),
            (
                r#"{"providers":[{"name":"a","kind":"openai","api_version":"1"}]}"#,
                "providers[0].api_version: only applies",
            ),
            (
                r#"{"providers":[{"name":"a","kind":"openai"},{"name":"a","kind":"openai"}]}"#,
                "providers[1].name: duplicate provider name \"a\"",
            ),
            (
                r#"{"providers":[{"name":"a b","kind":"openai"}]}"#,
                "providers[0].name: \"a b\" is not a valid name",
            ),
            (
                r#"{"providers":[{"name":"a","kind":"openai","api_key_env":"1X"}]}"#,
                "providers[0].api_key_env: \"1X\" is not a valid environment variable name",
            ),
            (
                r#"{"providers":[{"name":"a","kind":"openai","headers":{"Authorization":"x"}}]}"#,
                "providers[0].headers.Authorization: this header is set by the gateway",
            ),
            (
                r#"{"providers":[{"name":"a","kind":"openai"}]}"#,
                "models: at least one model is required",
            ),
            (
                r#"{"providers":[{"name":"a","kind":"openai"}],"models":[{"name":"m","provider":"a"},{"name":"n","provider":"anthropc"}]}"#,
                "models[1].provider: unknown provider \"anthropc\" (configured: a)",
            ),
            (
                r#"{"providers":[{"name":"a","kind":"openai"}],"models":[{"name":"m","provider":"a"},{"name":"n","provider":"a","aliases":["m"]}]}"#,
                "models[1].aliases[0]: model name \"m\" is already used",
            ),
            (
                r#"{"providers":[{"name":"a","kind":"openai"}],"models":[{"name":"m","provider":"a","deployment":"d"}]}"#,
                "models[0].deployment: only applies",
            ),
            (
                r#"{"providers":[{"name":"a","kind":"openai"}],"models":[{"name":"bad name","provider":"a"}]}"#,
                "models[0].name: \"bad name\" is not a valid model name",
            ),
            (
                r#"{"providers":[{"name":"a","kind":"openai"}],"models":[{"name":"m","provider":"a","aliases":"x"}]}"#,
                "models[0]: invalid type",
            ),
            (
                r#"{"providers":[{"name":"a","kind":"openai"}],"models":[{"name":"m","provider":"a"}],"max_request_bytes":0}"#,
                "max_request_bytes: must be a whole number",
            ),
            (
                r#"{"providers":[{"name":"a","kind":"openai"}],"models":[{"name":"m","provider":"a"}],"max_response_bytes":0}"#,
                "max_response_bytes: must be a whole number from 1 to 67108864",
            ),
            (
                r#"{"providers":[{"name":"a","kind":"openai"}],"models":[{"name":"m","provider":"a"}],"max_response_bytes":67108865}"#,
                "max_response_bytes: must be a whole number from 1 to 67108864",
            ),
            (
                r#"{"providers":[{"name":"a","kind":"openai"}],"models":[{"name":"m","provider":"a"}],"max_response_bytes":"16MiB"}"#,
                "max_response_bytes: must be a whole number",
            ),
            (
                r#"{"providers":[{"name":"a","kind":"openai"}],"models":[{"name":"m","provider":"a"}],"hosts":[]}"#,
                "hosts: must be a non-empty list",
            ),
            (
                r#"{"providers":[{"name":"a","kind":"openai"}],"models":[{"name":"m","provider":"a"}],"hosts":["llm.mesh","api.openai.com:80"]}"#,
                "hosts[1]: \"api.openai.com:80\" is not a host name",
            ),
            (
                r#"{"providers":[{"name":"a","kind":"openai"}],"models":[{"name":"m","provider":"a"}],"hosts":["a.b","A.b"]}"#,
                "hosts[1]: \"a.b\" is listed twice",
            ),
        ];
        for (doc, want) in cases {
            let got = compile_error(doc);
            assert!(
                got.starts_with(want),
                "for {doc}\n got: {got}\nwant: {want}"
            );
        }
    }

    #[test]
    fn hosts_select_the_requests_the_filter_handles() {
        let every = compiled(
            r#"{"providers":[{"name":"a","kind":"openai"}],"models":[{"name":"m","provider":"a"}]}"#,
        );
        assert!(every.config.handles_host("anything.example:8080"));
        let some = compiled(
            r#"{"providers":[{"name":"a","kind":"openai"}],"models":[{"name":"m","provider":"a"}],
                "hosts":["api.openai.com","LLM.mesh","*.llm.internal"]}"#,
        );
        for (authority, handled) in [
            ("api.openai.com", true),
            ("api.openai.com:80", true),
            ("API.OpenAI.com.", true),
            ("llm.mesh", true),
            ("eu.llm.internal:443", true),
            ("llm.internal", false),
            ("evilllm.internal", false),
            ("api.openai.com.evil.example", false),
            ("reviews.default.svc.cluster.local:9080", false),
            ("", false),
        ] {
            assert_eq!(some.config.handles_host(authority), handled, "{authority}");
        }
    }

    #[test]
    fn cache_errors_name_their_field() {
        let base = r#"{"providers": [{"name": "o", "kind": "openai", "api_key_env": "OPENAI_API_KEY"}],
            "models": [{"name": "m", "provider": "o"}], "identity": {"source": "mesh_node"}"#;
        for (extra, path) in [
            (r#""cache": {"shared": true}"#, "cache.shared"),
            (r#""cache": {"models": ["nope"]}"#, "cache.models[0]"),
            (
                r#""namespaces": {"shop": {"cache": "yes"}}"#,
                "namespaces.shop.cache",
            ),
        ] {
            let doc = format!("{base}, {extra}}}");
            let e = compile(doc.as_bytes(), &test_env).err().unwrap();
            assert_eq!(e.path, path, "{e}");
        }
        let doc =
            format!(r#"{base}, "cache": {{}}, "namespaces": {{"shop": {{"cache": false}}}}}}"#);
        assert!(compile(doc.as_bytes(), &test_env).is_ok());
    }

    #[test]
    fn documented_examples_compile() {
        let reference = include_str!("../../envoy/README.md");
        let mut n = 0;
        for block in reference.split("```json").skip(1) {
            let doc = block.split("```").next().unwrap();
            compile(doc.as_bytes(), &test_env).unwrap_or_else(|e| panic!("{e}\n{doc}"));
            n += 1;
        }
        assert_eq!(
            n, 23,
            "one example per documented provider, the routing, the two quota examples, the \
             shared quota example, the namespace policy example, the guardrails example and the \
             cache example"
        );
        let shipped = compiled(include_str!("../../envoy/meshllm.json"));
        assert_eq!(shipped.config.providers.len(), 10);
    }
}

#[cfg(test)]
mod responses_api_tests {
    use crate::config::testing::{compile_error, compiled};
    use crate::core::schema::Schema;

    #[test]
    fn an_openai_compatible_server_may_serve_responses_itself() {
        let c = compiled(
            r#"{"providers":[
                {"name":"vllm","kind":"openai_compatible","base_url":"http://vllm.local/v1",
                 "responses_api":true},
                {"name":"az","kind":"azure_openai","base_url":"https://x.openai.azure.com",
                 "api_version":"2024-10-21","responses_api":false}],
               "models":[{"name":"m","provider":"vllm"},{"name":"a","provider":"az"}]}"#,
        );
        let m = c.config.route("m").unwrap();
        assert_eq!(m.responses_path.as_deref(), Some("/v1/responses"));
        assert_eq!(m.schema_for(Schema::Responses), Schema::Responses);
        // An Azure resource without the v1 API gets the pivot.
        assert_eq!(c.config.route("a").unwrap().responses_path, None);
        let e = compile_error(
            r#"{"providers":[{"name":"a","kind":"anthropic","responses_api":true}],
               "models":[{"name":"m","provider":"a"}]}"#,
        );
        assert!(
            e.starts_with("providers[0].responses_api: only applies"),
            "{e}"
        );
    }
}
