//! Plugin configuration: one JSON document, validated and compiled once.
//!
//! `compile` turns the document into the runtime `Config` the request path
//! reads: providers with their precomputed authority, paths and auth header,
//! and a model table keyed by every public name and alias. Any problem is
//! reported with the field path it concerns, and nothing is half-applied.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::rc::Rc;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::core::json::quote;
use crate::core::schema::Schema;
use crate::core::url::percent_encode;
use crate::identity::{compile_identity, IdentityPolicy};
use crate::limits::{compile_attribution, compile_quotas, Known, QuotaPolicy, Tag};
use crate::nspolicy::{compile_allowed, compile_namespaces, ListenerCache, NamespacePolicy};
use crate::policy::{
    compile_attributes, compile_failover, compile_routes, Failover, ModelAttributes,
    RawCapabilities, RawPrice, RoutePolicy,
};
use crate::pricing::default_prices;
use crate::providers::{converse_path, default_base_url, ProviderKind, DEFAULT_ANTHROPIC_VERSION};

pub const DEFAULT_MAX_REQUEST_BYTES: usize = 10 * 1024 * 1024;
pub const DEFAULT_MAX_TOKENS: u64 = 4096;
const MAX_MAX_REQUEST_BYTES: usize = 64 * 1024 * 1024;
/// The largest answer the filter holds whole (a translated non-streamed
/// answer, or an error reply it rewrites): images in answers run to a few
/// MiB each, long texts to hundreds of KiB.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;
const MAX_MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub(crate) fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Which inbound API operation a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    ChatCompletions,
    Embeddings,
}

#[derive(Debug, Clone)]
pub struct Provider {
    pub name: String,
    pub kind: ProviderKind,
    /// Envoy cluster the request is sent to.
    pub cluster: String,
    /// Value for `:authority` (host, and port when not the scheme's default).
    pub authority: String,
    pub api_key_env: Option<String>,
    /// The provider's credential header, ready to set; None when the provider
    /// takes no key or its variable is not set (see `key_missing`).
    pub auth_header: Option<(&'static str, String)>,
    /// The key variable is configured but was empty or unset at load time.
    pub key_missing: bool,
    /// The raw key, kept only to scrub it from anything echoed to a client.
    pub api_key: Option<String>,
    pub extra_headers: Vec<(String, String)>,
    /// Path prefix from `base_url` (no trailing slash).
    pub base_path: String,
    pub api_version: Option<String>,
    /// `max_tokens` sent to Anthropic when the caller gave none (it is required there).
    pub default_max_tokens: u64,
    /// Vertex AI: the Google Cloud project.
    pub project: Option<String>,
    /// Vertex AI location or AWS region.
    pub region: Option<String>,
    /// Bedrock without an API key: SigV4 credentials read from the environment.
    pub aws_credentials: Option<AwsCredentials>,
}

/// AWS credentials for SigV4, read once from the proxy's environment.
#[derive(Clone)]
pub struct AwsCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

// Never print the secrets, even in debug output.
impl fmt::Debug for AwsCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AwsCredentials({})", self.access_key_id)
    }
}

impl Provider {
    /// Values that must never be echoed to a client (scrubbed from errors).
    pub fn secrets(&self) -> Vec<&str> {
        let mut out: Vec<&str> = self.api_key.as_deref().into_iter().collect();
        if let Some(c) = &self.aws_credentials {
            out.push(&c.secret_access_key);
            out.extend(c.session_token.as_deref());
        }
        out
    }
}

#[derive(Debug, Clone)]
pub struct ModelRoute {
    /// The public name callers use.
    pub name: String,
    /// More public names for the same route.
    pub aliases: Vec<String>,
    pub provider: usize,
    pub upstream_model: String,
    /// `upstream_model` as a JSON string literal, ready to splice into bodies.
    pub upstream_model_json: String,
    /// The API schema the provider speaks for this model.
    pub schema: Schema,
    pub chat_path: String,
    /// Where streamed chat calls go (Gemini, Vertex and Bedrock use another
    /// method); the same as `chat_path` otherwise.
    pub chat_stream_path: String,
    /// None when the provider has no embeddings API.
    pub embeddings_path: Option<String>,
    /// Vertex AI's Anthropic models take the model from the URL and an
    /// `anthropic_version` in the body instead.
    pub vertex_anthropic: bool,
    /// Price, capabilities and quality, for routing decisions.
    pub attributes: ModelAttributes,
}

impl ModelRoute {
    /// The name, then the aliases, as configured.
    pub fn public_names(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.name.as_str()).chain(self.aliases.iter().map(String::as_str))
    }

    pub fn path(&self, op: Operation, stream: bool) -> Option<&str> {
        match op {
            Operation::ChatCompletions if stream => Some(&self.chat_stream_path),
            Operation::ChatCompletions => Some(&self.chat_path),
            Operation::Embeddings => self.embeddings_path.as_deref(),
        }
    }
}

/// What a public name denotes: a model (by any of its names) or a route.
/// Allow-lists are sets of these, so allowing a model allows its aliases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// An index into `Config::models`.
    Model(usize),
    /// An index into `Config::routes`.
    Route(usize),
}

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

#[derive(Debug)]
pub struct Compiled {
    pub config: Config,
    /// Problems worth a log line that do not stop the filter.
    pub warnings: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    name: String,
    kind: String,
    #[serde(default)]
    base_url: Option<String>,
    #[serde(default)]
    cluster: Option<String>,
    #[serde(default)]
    api_key_env: Option<String>,
    #[serde(default)]
    api_version: Option<String>,
    #[serde(default)]
    headers: Option<HashMap<String, String>>,
    #[serde(default)]
    anthropic_version: Option<String>,
    #[serde(default)]
    default_max_tokens: Option<u64>,
    #[serde(default)]
    project: Option<String>,
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    aws_access_key_id_env: Option<String>,
    #[serde(default)]
    aws_secret_access_key_env: Option<String>,
    #[serde(default)]
    aws_session_token_env: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    name: String,
    provider: String,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    deployment: Option<String>,
    #[serde(default)]
    aliases: Vec<String>,
    #[serde(default)]
    publisher: Option<String>,
    #[serde(default)]
    price: Option<RawPrice>,
    #[serde(default)]
    capabilities: Option<RawCapabilities>,
    #[serde(default)]
    quality: Option<f64>,
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
];

/// A parsed `base_url`.
#[derive(Debug, PartialEq, Eq)]
pub struct BaseUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl BaseUrl {
    pub fn parse(url: &str) -> Result<BaseUrl, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!("{url:?} must start with https:// or http://"));
        };
        if rest.contains(['?', '#']) {
            return Err(format!("{url:?} must not have a query or fragment"));
        }
        let (hostport, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
                let port = p
                    .parse::<u16>()
                    .ok()
                    .filter(|&p| p != 0)
                    .ok_or_else(|| format!("{url:?} has an invalid port {p:?}"))?;
                (h, port)
            }
            _ => (hostport, if tls { 443 } else { 80 }),
        };
        let host_ok = !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '[' | ']' | ':'));
        if !host_ok {
            return Err(format!("{url:?} has no valid host"));
        }
        Ok(BaseUrl {
            tls,
            host: host.to_ascii_lowercase(),
            port,
            path: path.to_string(),
        })
    }

    pub fn authority(&self) -> String {
        let default = if self.tls { 443 } else { 80 };
        if self.port == default {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

fn valid_name(s: &str) -> bool {
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

fn valid_env_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

pub(crate) fn valid_header_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(':')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn deserialize_at<T: for<'de> Deserialize<'de>>(path: &str, v: &Value) -> Result<T, ConfigError> {
    T::deserialize(v).map_err(|e| ConfigError::new(path, e.to_string()))
}

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
    };
    let quotas = compile_quotas(obj.get("quotas"), &tags, &known)?;
    let hosts = compile_hosts(obj.get("hosts"))?;
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
    };
    // Allow-lists and namespace aliases name the document's public names.
    if let Some(v) = obj.get("allowed_models") {
        config.allowed_models = Some(compile_allowed("allowed_models", v, &|n| config.target(n))?);
    }
    config.namespaces = compile_namespaces(obj.get("namespaces"), &config)?;
    Ok(Compiled { config, warnings })
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

fn compile_providers(
    value: Option<&Value>,
    env: &dyn Fn(&str) -> Option<String>,
    warnings: &mut Vec<String>,
) -> Result<Vec<Provider>, ConfigError> {
    let list = match value {
        Some(Value::Array(list)) if !list.is_empty() => list,
        Some(Value::Array(_)) | None => {
            return Err(ConfigError::new(
                "providers",
                "at least one provider is required",
            ))
        }
        Some(_) => return Err(ConfigError::new("providers", "must be an array")),
    };
    let mut providers: Vec<Provider> = Vec::with_capacity(list.len());
    for (i, v) in list.iter().enumerate() {
        let at = format!("providers[{i}]");
        let raw: RawProvider = deserialize_at(&at, v)?;
        if !valid_name(&raw.name) {
            return Err(ConfigError::new(
                format!("{at}.name"),
                format!(
                    "{:?} is not a valid name (letters, digits, '-', '_', '.')",
                    raw.name
                ),
            ));
        }
        if providers.iter().any(|p| p.name == raw.name) {
            return Err(ConfigError::new(
                format!("{at}.name"),
                format!("duplicate provider name {:?}", raw.name),
            ));
        }
        let kind = ProviderKind::parse(&raw.kind).ok_or_else(|| {
            ConfigError::new(
                format!("{at}.kind"),
                format!(
                    "unknown provider kind {:?} (expected one of: {})",
                    raw.kind,
                    ProviderKind::NAMES
                ),
            )
        })?;
        let region = compile_region(&at, kind, &raw)?;
        let project = match (kind, &raw.project) {
            (ProviderKind::VertexAi, Some(p)) if valid_name(p) => Some(p.clone()),
            (ProviderKind::VertexAi, Some(p)) => {
                return Err(ConfigError::new(
                    format!("{at}.project"),
                    format!("{p:?} is not a valid Google Cloud project id"),
                ))
            }
            (ProviderKind::VertexAi, None) => {
                return Err(ConfigError::new(
                    format!("{at}.project"),
                    "required for kind \"vertex_ai\"",
                ))
            }
            (_, Some(_)) => {
                return Err(ConfigError::new(
                    format!("{at}.project"),
                    "only applies to kind \"vertex_ai\"",
                ))
            }
            (_, None) => None,
        };
        let base_url = match (kind, raw.base_url.clone()) {
            (_, Some(url)) => url,
            (_, None) => default_base_url(kind, region.as_deref()).ok_or_else(|| {
                ConfigError::new(
                    format!("{at}.base_url"),
                    format!("required for kind {:?}", raw.kind),
                )
            })?,
        };
        let url =
            BaseUrl::parse(&base_url).map_err(|e| ConfigError::new(format!("{at}.base_url"), e))?;
        match (kind, &raw.api_version) {
            (ProviderKind::AzureOpenAi, None) => {
                return Err(ConfigError::new(
                    format!("{at}.api_version"),
                    "required for kind \"azure_openai\" (for example \"2024-10-21\")",
                ))
            }
            (ProviderKind::AzureOpenAi, Some(v)) if !valid_model_name(v) => {
                return Err(ConfigError::new(
                    format!("{at}.api_version"),
                    format!("{v:?} is not a valid API version"),
                ))
            }
            (ProviderKind::AzureOpenAi, Some(_)) | (_, None) => {}
            (_, Some(_)) => {
                return Err(ConfigError::new(
                    format!("{at}.api_version"),
                    "only applies to kind \"azure_openai\"",
                ))
            }
        }
        let cluster = raw.cluster.clone().unwrap_or_else(|| raw.name.clone());
        if !valid_name(&cluster) {
            return Err(ConfigError::new(
                format!("{at}.cluster"),
                format!("{cluster:?} is not a valid cluster name"),
            ));
        }
        let mut api_key = None;
        let mut key_missing = false;
        let aws_credentials =
            compile_aws_credentials(&at, kind, &raw, env, warnings, &mut key_missing)?;
        if let Some(var) = &raw.api_key_env {
            if !valid_env_name(var) {
                return Err(ConfigError::new(
                    format!("{at}.api_key_env"),
                    format!("{var:?} is not a valid environment variable name"),
                ));
            }
            match env(var).map(|k| k.trim().to_string()) {
                Some(k) if !k.is_empty() => api_key = Some(k),
                _ => {
                    key_missing = true;
                    warnings.push(format!(
                        "{at}.api_key_env: environment variable {var} is not set in the proxy; \
                         requests routed to provider {:?} will fail until it is",
                        raw.name
                    ));
                }
            }
        }
        let auth_header = api_key.as_ref().map(|k| match kind {
            ProviderKind::AzureOpenAi => ("api-key", k.clone()),
            ProviderKind::Anthropic => ("x-api-key", k.clone()),
            ProviderKind::Gemini => ("x-goog-api-key", k.clone()),
            // OpenAI and compatibles; Vertex AI access tokens; Bedrock API keys.
            _ => ("authorization", format!("Bearer {k}")),
        });
        let mut extra_headers: Vec<(String, String)> = Vec::new();
        if let Some(h) = &raw.headers {
            for (name, value) in h {
                let lower = name.to_ascii_lowercase();
                if !valid_header_name(name) || value.contains(['\r', '\n', '\0']) {
                    return Err(ConfigError::new(
                        format!("{at}.headers.{name}"),
                        "invalid header name or value",
                    ));
                }
                if matches!(
                    lower.as_str(),
                    "authorization"
                        | "api-key"
                        | "x-api-key"
                        | "x-goog-api-key"
                        | "x-amz-date"
                        | "x-amz-security-token"
                        | "x-amz-content-sha256"
                        | "host"
                        | "content-length"
                        | "x-meshllm-cluster"
                ) {
                    return Err(ConfigError::new(
                        format!("{at}.headers.{name}"),
                        "this header is set by the gateway and cannot be configured",
                    ));
                }
                extra_headers.push((lower, value.clone()));
            }
        }
        let anthropic_only = |field: &str| {
            ConfigError::new(
                format!("{at}.{field}"),
                "only applies to providers of kind \"anthropic\"",
            )
        };
        let mut default_max_tokens = DEFAULT_MAX_TOKENS;
        if kind == ProviderKind::Anthropic {
            let version = raw
                .anthropic_version
                .clone()
                .unwrap_or_else(|| DEFAULT_ANTHROPIC_VERSION.to_string());
            if !valid_model_name(&version) {
                return Err(ConfigError::new(
                    format!("{at}.anthropic_version"),
                    format!("{version:?} is not a valid version"),
                ));
            }
            extra_headers.retain(|(n, _)| n != "anthropic-version");
            extra_headers.push(("anthropic-version".to_string(), version));
            if let Some(n) = raw.default_max_tokens {
                if n == 0 || n > 1_000_000 {
                    return Err(ConfigError::new(
                        format!("{at}.default_max_tokens"),
                        "must be a whole number from 1 to 1000000",
                    ));
                }
                default_max_tokens = n;
            }
        } else if raw.anthropic_version.is_some() {
            return Err(anthropic_only("anthropic_version"));
        } else if raw.default_max_tokens.is_some() {
            return Err(anthropic_only("default_max_tokens"));
        }
        extra_headers.sort();
        providers.push(Provider {
            name: raw.name,
            kind,
            cluster,
            authority: url.authority(),
            api_key_env: raw.api_key_env,
            auth_header,
            key_missing,
            api_key,
            extra_headers,
            base_path: url.path,
            api_version: raw.api_version,
            default_max_tokens,
            project,
            region,
            aws_credentials,
        });
    }
    Ok(providers)
}

fn compile_region(
    at: &str,
    kind: ProviderKind,
    raw: &RawProvider,
) -> Result<Option<String>, ConfigError> {
    let needs = matches!(kind, ProviderKind::VertexAi | ProviderKind::Bedrock);
    match &raw.region {
        None if needs => Err(ConfigError::new(
            format!("{at}.region"),
            format!(
                "required for kind {:?} (for example {})",
                raw.kind,
                if kind == ProviderKind::Bedrock {
                    "\"us-east-1\""
                } else {
                    "\"us-central1\" or \"global\""
                }
            ),
        )),
        None => Ok(None),
        Some(_) if !needs => Err(ConfigError::new(
            format!("{at}.region"),
            "only applies to kinds \"vertex_ai\" and \"bedrock\"",
        )),
        Some(r)
            if !r.is_empty()
                && r.len() <= 64
                && r.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') =>
        {
            Ok(Some(r.clone()))
        }
        Some(r) => Err(ConfigError::new(
            format!("{at}.region"),
            format!("{r:?} is not a valid region name"),
        )),
    }
}

const AWS_ENV_DEFAULTS: [(&str, &str); 3] = [
    ("aws_access_key_id_env", "AWS_ACCESS_KEY_ID"),
    ("aws_secret_access_key_env", "AWS_SECRET_ACCESS_KEY"),
    ("aws_session_token_env", "AWS_SESSION_TOKEN"),
];

/// Bedrock signs with SigV4 unless an API key (`api_key_env`, sent as a
/// bearer token) is configured instead.
fn compile_aws_credentials(
    at: &str,
    kind: ProviderKind,
    raw: &RawProvider,
    env: &dyn Fn(&str) -> Option<String>,
    warnings: &mut Vec<String>,
    key_missing: &mut bool,
) -> Result<Option<AwsCredentials>, ConfigError> {
    let given = [
        &raw.aws_access_key_id_env,
        &raw.aws_secret_access_key_env,
        &raw.aws_session_token_env,
    ];
    if kind != ProviderKind::Bedrock || raw.api_key_env.is_some() {
        for ((field, _), value) in AWS_ENV_DEFAULTS.iter().zip(given) {
            if value.is_some() {
                return Err(ConfigError::new(
                    format!("{at}.{field}"),
                    if kind == ProviderKind::Bedrock {
                        "cannot be combined with api_key_env (a Bedrock API key replaces SigV4)"
                    } else {
                        "only applies to kind \"bedrock\""
                    },
                ));
            }
        }
        return Ok(None);
    }
    let mut values: Vec<Option<String>> = Vec::with_capacity(3);
    for ((field, default), value) in AWS_ENV_DEFAULTS.iter().zip(given) {
        let var = value.as_deref().unwrap_or(default);
        if !valid_env_name(var) {
            return Err(ConfigError::new(
                format!("{at}.{field}"),
                format!("{var:?} is not a valid environment variable name"),
            ));
        }
        values.push(
            env(var)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty()),
        );
    }
    let mut values = values.into_iter();
    match (
        values.next().flatten(),
        values.next().flatten(),
        values.next().flatten(),
    ) {
        (Some(access_key_id), Some(secret_access_key), session_token) => Ok(Some(AwsCredentials {
            access_key_id,
            secret_access_key,
            session_token,
        })),
        _ => {
            *key_missing = true;
            warnings.push(format!(
                "{at}: AWS credentials ({} and {}) are not set in the proxy; requests routed to \
                 provider {:?} will fail until they are",
                raw.aws_access_key_id_env
                    .as_deref()
                    .unwrap_or(AWS_ENV_DEFAULTS[0].1),
                raw.aws_secret_access_key_env
                    .as_deref()
                    .unwrap_or(AWS_ENV_DEFAULTS[1].1),
                raw.name
            ));
            Ok(None)
        }
    }
}

type ModelTable = (Vec<ModelRoute>, HashMap<String, usize>);

fn compile_models(
    value: Option<&Value>,
    providers: &[Provider],
) -> Result<ModelTable, ConfigError> {
    let list = match value {
        Some(Value::Array(list)) if !list.is_empty() => list,
        Some(Value::Array(_)) | None => {
            return Err(ConfigError::new("models", "at least one model is required"))
        }
        Some(_) => return Err(ConfigError::new("models", "must be an array")),
    };
    let mut models = Vec::with_capacity(list.len());
    let mut by_name: HashMap<String, usize> = HashMap::new();
    for (i, v) in list.iter().enumerate() {
        let at = format!("models[{i}]");
        let raw: RawModel = deserialize_at(&at, v)?;
        let provider = providers
            .iter()
            .position(|p| p.name == raw.provider)
            .ok_or_else(|| {
                let known: Vec<&str> = providers.iter().map(|p| p.name.as_str()).collect();
                ConfigError::new(
                    format!("{at}.provider"),
                    format!(
                        "unknown provider {:?} (configured: {})",
                        raw.provider,
                        known.join(", ")
                    ),
                )
            })?;
        let kind = providers[provider].kind;
        for (field, name) in std::iter::once(("name".to_string(), &raw.name)).chain(
            raw.aliases
                .iter()
                .enumerate()
                .map(|(j, a)| (format!("aliases[{j}]"), a)),
        ) {
            if !valid_model_name(name) {
                return Err(ConfigError::new(
                    format!("{at}.{field}"),
                    format!("{name:?} is not a valid model name"),
                ));
            }
            if by_name.insert(name.clone(), i).is_some() {
                return Err(ConfigError::new(
                    format!("{at}.{field}"),
                    format!("model name {name:?} is already used by another entry"),
                ));
            }
        }
        let upstream_model = raw.model.clone().unwrap_or_else(|| raw.name.clone());
        if upstream_model.is_empty() || upstream_model.len() > 256 {
            return Err(ConfigError::new(
                format!("{at}.model"),
                "must be a non-empty upstream model name",
            ));
        }
        let p = &providers[provider];
        let base_path = &p.base_path;
        let (chat_path, embeddings_path) = match kind {
            ProviderKind::AzureOpenAi => {
                let deployment = raw
                    .deployment
                    .clone()
                    .unwrap_or_else(|| upstream_model.clone());
                if !valid_model_name(&deployment) || deployment.contains('/') {
                    return Err(ConfigError::new(
                        format!("{at}.deployment"),
                        format!("{deployment:?} is not a valid deployment name"),
                    ));
                }
                let version = p.api_version.as_deref().unwrap_or_default();
                let prefix = format!("{base_path}/openai/deployments/{deployment}");
                (
                    format!("{prefix}/chat/completions?api-version={version}"),
                    Some(format!("{prefix}/embeddings?api-version={version}")),
                )
            }
            _ if raw.deployment.is_some() => {
                return Err(ConfigError::new(
                    format!("{at}.deployment"),
                    "only applies to providers of kind \"azure_openai\"",
                ))
            }
            ProviderKind::OpenAi | ProviderKind::OpenAiCompatible => (
                format!("{base_path}/chat/completions"),
                Some(format!("{base_path}/embeddings")),
            ),
            ProviderKind::Anthropic => (format!("{base_path}/messages"), None),
            ProviderKind::Gemini | ProviderKind::VertexAi | ProviderKind::Bedrock => {
                (String::new(), None)
            }
        };
        if raw.publisher.is_some() && kind != ProviderKind::VertexAi {
            return Err(ConfigError::new(
                format!("{at}.publisher"),
                "only applies to providers of kind \"vertex_ai\"",
            ));
        }
        // Google paths take the model id percent-encoded, but write versioned
        // ids with a literal '@' (claude-sonnet-4-5@20250929).

        let in_path = percent_encode(&upstream_model).replace("%40", "@");
        let (schema, chat_path, chat_stream_path, vertex_anthropic) = match kind {
            ProviderKind::OpenAi | ProviderKind::OpenAiCompatible | ProviderKind::AzureOpenAi => {
                (Schema::OpenAi, chat_path.clone(), chat_path, false)
            }
            ProviderKind::Anthropic => (Schema::Anthropic, chat_path.clone(), chat_path, false),
            ProviderKind::Gemini => (
                Schema::Gemini,
                format!("{base_path}/models/{in_path}:generateContent"),
                format!("{base_path}/models/{in_path}:streamGenerateContent?alt=sse"),
                false,
            ),
            ProviderKind::VertexAi => {
                let publisher = match raw.publisher.as_deref() {
                    Some(p @ ("google" | "anthropic")) => p,
                    Some(other) => {
                        return Err(ConfigError::new(
                            format!("{at}.publisher"),
                            format!("{other:?} is not supported (expected google or anthropic)"),
                        ))
                    }
                    None if upstream_model.starts_with("claude") => "anthropic",
                    None => "google",
                };
                let prefix = format!(
                    "{base_path}/projects/{}/locations/{}/publishers/{publisher}/models/{in_path}",
                    p.project.as_deref().unwrap_or_default(),
                    p.region.as_deref().unwrap_or_default(),
                );
                if publisher == "anthropic" {
                    (
                        Schema::Anthropic,
                        format!("{prefix}:rawPredict"),
                        format!("{prefix}:streamRawPredict"),
                        true,
                    )
                } else {
                    (
                        Schema::Gemini,
                        format!("{prefix}:generateContent"),
                        format!("{prefix}:streamGenerateContent?alt=sse"),
                        false,
                    )
                }
            }
            ProviderKind::Bedrock => (
                Schema::Converse,
                format!("{base_path}{}", converse_path(&upstream_model, false)),
                format!("{base_path}{}", converse_path(&upstream_model, true)),
                false,
            ),
        };
        let mut attributes = compile_attributes(
            &at,
            schema,
            raw.price.as_ref(),
            raw.capabilities.as_ref(),
            raw.quality,
        )?;
        // Without a configured price, the built-in list price (if known).
        if raw.price.is_none() {
            if let Some(p) = default_prices(p.kind.name(), &upstream_model) {
                attributes.input_price = Some(p.input);
                attributes.output_price = Some(p.output);
                attributes.cached_input_price = p.cached_input;
            }
        }
        models.push(ModelRoute {
            name: raw.name,
            aliases: raw.aliases,
            provider,
            upstream_model_json: quote(&upstream_model),
            upstream_model,
            schema,
            chat_path,
            chat_stream_path,
            embeddings_path,
            vertex_anthropic,
            attributes,
        });
    }
    Ok((models, by_name))
}

fn model_object(id: &str, owner: &str) -> Value {
    serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": owner})
}

/// `GET /v1/models/{id}` in OpenAI's shape.
pub fn model_body(id: &str, owner: &str) -> Vec<u8> {
    model_object(id, owner).to_string().into_bytes()
}

/// `GET /v1/models` in OpenAI's shape, for (id, owner) pairs.
pub fn models_list_body<'a>(entries: impl Iterator<Item = (&'a str, &'a str)>) -> Vec<u8> {
    let data: Vec<Value> = entries.map(|(id, owner)| model_object(id, owner)).collect();
    serde_json::json!({"object": "list", "data": data})
        .to_string()
        .into_bytes()
}

/// Header names any provider attempt may set, sorted and unique.
fn attempt_header_names(providers: &[Provider]) -> Vec<String> {
    let mut names: Vec<String> = ["x-amz-date", "x-amz-content-sha256", "x-amz-security-token"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for p in providers {
        names.extend(p.auth_header.iter().map(|(n, _)| n.to_string()));
        names.extend(p.extra_headers.iter().map(|(n, _)| n.clone()));
        if p.aws_credentials.is_some() {
            names.push("authorization".into());
        }
    }
    names.sort();
    names.dedup();
    names
}

fn model_listing(
    models: &[ModelRoute],
    providers: &[Provider],
    routes: &[RoutePolicy],
) -> (Vec<u8>, HashMap<String, Vec<u8>>) {
    let mut data = Vec::new();
    let mut bodies = HashMap::new();
    for route in models {
        let owner = &providers[route.provider].name;
        for name in route.public_names() {
            let obj = model_object(name, owner);
            bodies.insert(name.to_string(), obj.to_string().into_bytes());
            data.push(obj);
        }
    }
    // Routes are served by the gateway itself, across providers.
    for route in routes {
        let obj = model_object(&route.name, "meshllm");
        bodies.insert(route.name.clone(), obj.to_string().into_bytes());
        data.push(obj);
    }
    let list = serde_json::json!({"object": "list", "data": data});
    (list.to_string().into_bytes(), bodies)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(var: &str) -> Option<String> {
        match var {
            "OPENAI_API_KEY" => Some("sk-test-openai".into()),
            "AZURE_KEY" => Some("az-secret".into()),
            "EMPTY" => Some("  ".into()),
            _ => None,
        }
    }

    fn ok(doc: &str) -> Compiled {
        compile(doc.as_bytes(), &env).unwrap_or_else(|e| panic!("{e}"))
    }

    fn err(doc: &str) -> String {
        compile(doc.as_bytes(), &env).unwrap_err().to_string()
    }

    const GOOD: &str = r#"{
      "providers": [
        {"name": "openai", "kind": "openai", "api_key_env": "OPENAI_API_KEY"},
        {"name": "azure", "kind": "azure_openai", "base_url": "https://res.openai.azure.com",
         "api_version": "2024-10-21", "api_key_env": "AZURE_KEY"},
        {"name": "groq", "kind": "openai_compatible", "base_url": "https://api.groq.com/openai/v1/",
         "api_key_env": "GROQ_API_KEY", "headers": {"X-Title": "meshllm"}},
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
        let c = ok(GOOD);
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

        let azure = cfg.route("gpt-4o").unwrap();
        assert_eq!(
            azure.chat_path,
            "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21"
        );
        assert_eq!(
            cfg.providers[1].auth_header,
            Some(("api-key", "az-secret".to_string()))
        );

        let fast = cfg.route("fast").unwrap();
        assert_eq!(fast.upstream_model, "llama-3.1-8b-instant");
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
        assert!(c.warnings[0].contains("GROQ_API_KEY"));
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
        let c = ok(GOOD);
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
        assert!(!all.contains("sk-test") && !all.contains("az-secret"));
    }

    #[test]
    fn blank_key_counts_as_missing() {
        let c = ok(
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
            let got = err(doc);
            assert!(
                got.starts_with(want),
                "for {doc}\n got: {got}\nwant: {want}"
            );
        }
    }

    #[test]
    fn hosts_select_the_requests_the_filter_handles() {
        let every = ok(
            r#"{"providers":[{"name":"a","kind":"openai"}],"models":[{"name":"m","provider":"a"}]}"#,
        );
        assert!(every.config.handles_host("anything.example:8080"));
        let some = ok(
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
    fn documented_examples_compile() {
        let reference = include_str!("../envoy/README.md");
        let mut n = 0;
        for block in reference.split("```json").skip(1) {
            let doc = block.split("```").next().unwrap();
            compile(doc.as_bytes(), &env).unwrap_or_else(|e| panic!("{e}\n{doc}"));
            n += 1;
        }
        assert_eq!(
            n, 20,
            "one example per documented provider, the routing, the two quota examples and the \
             namespace policy example"
        );
        let shipped = ok(include_str!("../envoy/meshllm.json"));
        assert_eq!(shipped.config.providers.len(), 10);
    }

    #[test]
    fn base_url_parsing() {
        let u = BaseUrl::parse("https://API.example.com:8443/v1/").unwrap();
        assert_eq!(
            u,
            BaseUrl {
                tls: true,
                host: "api.example.com".into(),
                port: 8443,
                path: "/v1".into()
            }
        );
        assert_eq!(u.authority(), "api.example.com:8443");
        let u = BaseUrl::parse("http://127.0.0.1").unwrap();
        assert_eq!(
            (u.port, u.path.as_str(), u.authority().as_str()),
            (80, "", "127.0.0.1")
        );
        assert!(BaseUrl::parse("https://").is_err());
        assert!(BaseUrl::parse("https://x/v1?a=b").is_err());
        assert!(BaseUrl::parse("https://x y/").is_err());
    }
}
