//! The `providers` section: each provider's endpoint, credentials and fixed
//! headers, read and checked once. What a kind is by itself (its default
//! URL, its API's fixed parts) is in `crate::providers`.

use std::collections::HashMap;
use std::fmt;

use serde::Deserialize;
use serde_json::Value;

use crate::config::error::{deserialize_at, ConfigError};
use crate::config::names::{valid_env_name, valid_header_name, valid_model_name, valid_name};
use crate::providers::{default_base_url, ProviderKind, DEFAULT_ANTHROPIC_VERSION};

/// `max_tokens` sent to Anthropic when the caller gave none and the provider
/// sets no `default_max_tokens`.
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

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
    /// Serves `POST /responses` itself, so Responses callers reach it as
    /// they are: OpenAI and Azure OpenAI by default, an OpenAI-compatible
    /// server when its config says so.
    pub responses_api: bool,
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
    #[serde(default)]
    responses_api: Option<bool>,
}

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

pub(crate) fn compile_providers(
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
        let responses_api = match (kind, raw.responses_api) {
            (ProviderKind::OpenAi | ProviderKind::AzureOpenAi, r) => r.unwrap_or(true),
            (ProviderKind::OpenAiCompatible, r) => r.unwrap_or(false),
            (_, None) => false,
            (_, Some(_)) => {
                return Err(ConfigError::new(
                    format!("{at}.responses_api"),
                    "only applies to providers of kind openai, azure_openai and \
                     openai_compatible",
                ))
            }
        };
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
            responses_api,
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

/// Header names any provider attempt may set, sorted and unique.
pub(crate) fn attempt_header_names(providers: &[Provider]) -> Vec<String> {
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

#[cfg(test)]
mod tests {
    use super::*;

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

#[cfg(test)]
#[path = "provider_table_tests.rs"]
mod provider_table;
