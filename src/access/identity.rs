//! Who is calling: the caller's namespace and service, taken from what the
//! mesh vouches for, never from what a client merely claims.
//!
//! | `identity.source` | where it comes from                              | trust                          |
//! |-------------------|--------------------------------------------------|--------------------------------|
//! | `mesh_node`       | the proxy's own node metadata (Istio sidecar)    | the sidecar serves one workload|
//! | `mesh_peer`       | the peer's mTLS certificate (SPIFFE URI SAN)     | the mesh CA signed it          |
//! | `trusted_header`  | a header a trusted front proxy sets              | only behind that proxy         |
//! | `virtual_key`     | a gateway-issued key, stored as its SHA-256      | whoever holds the key          |
//!
//! A request whose identity cannot be established gets the configured
//! `default` caller, or is refused.

use std::cell::OnceCell;
use std::collections::HashMap;

use serde::Deserialize;
use serde_json::Value;

use crate::config::error::ConfigError;
use crate::config::names::{valid_header_name, valid_model_name};
use crate::core::sha256::{hex, sha256};
use crate::host::Host;

/// The caller a request is accounted to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub namespace: String,
    pub service: String,
    /// The configured name of the virtual key the caller presented.
    pub virtual_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    MeshNode,
    MeshPeer,
    TrustedHeader(String),
    VirtualKey,
}

#[derive(Debug)]
pub struct IdentityPolicy {
    pub source: Source,
    /// Virtual keys by the hex SHA-256 of the key.
    keys: HashMap<String, Caller>,
    default: Option<Caller>,
    /// The node's identity never changes while the proxy runs.
    node: OnceCell<Option<Caller>>,
}

/// Why no caller could be named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityError {
    /// Nothing identified the caller (and no default is configured).
    Unidentified(&'static str),
    /// A virtual key was required and the one presented is unknown.
    UnknownKey,
}

/// Client headers that may carry a virtual key, as each SDK sends its key.
const KEY_HEADERS: &[&str] = &["authorization", "x-api-key", "api-key", "x-goog-api-key"];

/// Istio's node metadata: the workload's namespace and labels (Envoy names
/// the node `xds.node`).
const NODE_NAMESPACE: &[&str] = &["xds", "node", "metadata", "NAMESPACE"];
const NODE_SERVICE_CANDIDATES: &[&[&str]] = &[
    &[
        "xds",
        "node",
        "metadata",
        "LABELS",
        "service.istio.io/canonical-name",
    ],
    &["xds", "node", "metadata", "LABELS", "app"],
    &["xds", "node", "metadata", "WORKLOAD_NAME"],
];
/// The first URI SAN of the peer's certificate (mTLS).
const PEER_URI_SAN: &[&str] = &["connection", "uri_san_peer_certificate"];

impl IdentityPolicy {
    /// The caller of the current request.
    pub fn resolve(&self, host: &dyn Host) -> Result<Caller, IdentityError> {
        let found = match &self.source {
            Source::MeshNode => self.node.get_or_init(|| node_identity(host)).clone().ok_or(
                IdentityError::Unidentified(
                    "the proxy's node metadata names no namespace and workload",
                ),
            ),
            Source::MeshPeer => host
                .property(PEER_URI_SAN)
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|uri| spiffe_identity(&uri))
                .ok_or(IdentityError::Unidentified(
                    "the connection carries no mesh (SPIFFE) client certificate",
                )),
            Source::TrustedHeader(name) => host
                .request_header(name)
                .and_then(|v| header_identity(&v))
                .ok_or(IdentityError::Unidentified(
                    "the trusted identity header is missing or malformed",
                )),
            Source::VirtualKey => match presented_key(host) {
                None => Err(IdentityError::Unidentified("no API key was presented")),
                Some(key) => self
                    .keys
                    .get(&hex(&sha256(key.as_bytes())))
                    .cloned()
                    .ok_or(IdentityError::UnknownKey),
            },
        };
        match (found, &self.default) {
            (Ok(caller), _) => Ok(caller),
            (Err(IdentityError::Unidentified(_)), Some(default)) => Ok(default.clone()),
            (Err(e), _) => Err(e),
        }
    }

    /// The header the filter must remove before forwarding, if any.
    pub fn header(&self) -> Option<&str> {
        match &self.source {
            Source::TrustedHeader(name) => Some(name),
            _ => None,
        }
    }

    pub fn has_key(&self, name: &str) -> bool {
        self.keys
            .values()
            .any(|c| c.virtual_key.as_deref() == Some(name))
    }
}

fn node_identity(host: &dyn Host) -> Option<Caller> {
    let text = |path: &[&str]| {
        host.property(path)
            .and_then(|b| String::from_utf8(b).ok())
            .filter(|s| valid_segment(s))
    };
    let namespace = text(NODE_NAMESPACE)?;
    let service = NODE_SERVICE_CANDIDATES.iter().find_map(|p| text(p))?;
    Some(Caller {
        namespace,
        service,
        virtual_key: None,
    })
}

/// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`, Istio's
/// workload identity; the service account names the service.
pub fn spiffe_identity(uri: &str) -> Option<Caller> {
    let rest = uri.strip_prefix("spiffe://")?;
    let (_trust_domain, path) = rest.split_once('/')?;
    let mut parts = path.split('/');
    match (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) {
        (Some("ns"), Some(ns), Some("sa"), Some(sa), None)
            if valid_segment(ns) && valid_segment(sa) =>
        {
            Some(Caller {
                namespace: ns.to_string(),
                service: sa.to_string(),
                virtual_key: None,
            })
        }
        _ => None,
    }
}

/// `namespace/service` as a trusted front proxy writes it.
pub fn header_identity(value: &str) -> Option<Caller> {
    let (ns, svc) = value.trim().split_once('/')?;
    (valid_segment(ns) && valid_segment(svc)).then(|| Caller {
        namespace: ns.to_string(),
        service: svc.to_string(),
        virtual_key: None,
    })
}

/// Kubernetes names: lowercase letters, digits, '-' and '.', at most 253.
pub fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'_')
        })
}

fn presented_key(host: &dyn Host) -> Option<String> {
    KEY_HEADERS.iter().find_map(|name| {
        let v = host.request_header(name)?;
        let v = v.trim();
        let key = match v.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
            _ => v,
        };
        (!key.is_empty()).then(|| key.to_string())
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    source: String,
    #[serde(default)]
    header: Option<String>,
    #[serde(default)]
    virtual_keys: Vec<RawKey>,
    #[serde(default)]
    default: Option<RawCaller>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    name: String,
    sha256: String,
    namespace: String,
    service: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCaller {
    namespace: String,
    service: String,
}

const SOURCES: &str = "mesh_node, mesh_peer, trusted_header, virtual_key";

/// Compiles the `identity` section; None when it is absent.
pub fn compile_identity(value: Option<&Value>) -> Result<Option<IdentityPolicy>, ConfigError> {
    let Some(value) = value else { return Ok(None) };
    let raw =
        RawIdentity::deserialize(value).map_err(|e| ConfigError::new("identity", e.to_string()))?;
    let segment = |at: String, s: &str| {
        if valid_segment(s) {
            Ok(s.to_string())
        } else {
            Err(ConfigError::new(
                at,
                format!("{s:?} is not a valid name (lowercase letters, digits, '-', '.', '_')"),
            ))
        }
    };
    let source = match raw.source.as_str() {
        "mesh_node" => Source::MeshNode,
        "mesh_peer" => Source::MeshPeer,
        "virtual_key" => Source::VirtualKey,
        "trusted_header" => {
            let name = raw.header.as_deref().ok_or_else(|| {
                ConfigError::new(
                    "identity.header",
                    "is required by the trusted_header source",
                )
            })?;
            let lower = name.to_ascii_lowercase();
            if !valid_header_name(&lower) || lower.starts_with(':') {
                return Err(ConfigError::new(
                    "identity.header",
                    format!("{name:?} is not a valid header name"),
                ));
            }
            Source::TrustedHeader(lower)
        }
        other => {
            return Err(ConfigError::new(
                "identity.source",
                format!("unknown source {other:?} (expected one of: {SOURCES})"),
            ))
        }
    };
    if raw.header.is_some() && !matches!(source, Source::TrustedHeader(_)) {
        return Err(ConfigError::new(
            "identity.header",
            "only applies to the trusted_header source",
        ));
    }
    if !raw.virtual_keys.is_empty() && source != Source::VirtualKey {
        return Err(ConfigError::new(
            "identity.virtual_keys",
            "only applies to the virtual_key source",
        ));
    }
    if source == Source::VirtualKey && raw.virtual_keys.is_empty() {
        return Err(ConfigError::new(
            "identity.virtual_keys",
            "the virtual_key source needs at least one key",
        ));
    }
    let mut keys = HashMap::new();
    let mut names: Vec<&str> = Vec::new();
    for (i, k) in raw.virtual_keys.iter().enumerate() {
        let at = format!("identity.virtual_keys[{i}]");
        let digest = k.sha256.to_ascii_lowercase();
        if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ConfigError::new(
                format!("{at}.sha256"),
                "must be the key's SHA-256 as 64 hex digits (the key itself is never stored)",
            ));
        }
        if !valid_model_name(&k.name) || names.contains(&k.name.as_str()) {
            return Err(ConfigError::new(
                format!("{at}.name"),
                format!("{:?} is not a valid, unique key name", k.name),
            ));
        }
        names.push(&k.name);
        let caller = Caller {
            namespace: segment(format!("{at}.namespace"), &k.namespace)?,
            service: segment(format!("{at}.service"), &k.service)?,
            virtual_key: Some(k.name.clone()),
        };
        if keys.insert(digest, caller).is_some() {
            return Err(ConfigError::new(
                format!("{at}.sha256"),
                "the same key is listed twice",
            ));
        }
    }
    let default = match &raw.default {
        None => None,
        Some(d) => Some(Caller {
            namespace: segment("identity.default.namespace".into(), &d.namespace)?,
            service: segment("identity.default.service".into(), &d.service)?,
            virtual_key: None,
        }),
    };
    Ok(Some(IdentityPolicy {
        source,
        keys,
        default,
        node: OnceCell::new(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_uris() {
        let ok = spiffe_identity("spiffe://cluster.local/ns/shop/sa/chatbot").unwrap();
        assert_eq!(
            (ok.namespace.as_str(), ok.service.as_str()),
            ("shop", "chatbot")
        );
        for bad in [
            "spiffe://cluster.local/ns/shop",
            "spiffe://cluster.local/ns/shop/sa/chatbot/extra",
            "spiffe://cluster.local/sa/chatbot/ns/shop",
            "https://cluster.local/ns/shop/sa/chatbot",
            "spiffe://cluster.local/ns/Shop/sa/chatbot",
            "spiffe://cluster.local/ns//sa/chatbot",
            "",
        ] {
            assert_eq!(spiffe_identity(bad), None, "{bad}");
        }
    }

    #[test]
    fn trusted_header_values() {
        let ok = header_identity(" team-a/api.v2 ").unwrap();
        assert_eq!(
            (ok.namespace.as_str(), ok.service.as_str()),
            ("team-a", "api.v2")
        );
        for bad in ["team-a", "/svc", "ns/", "ns/svc/x", "NS/svc", "ns/s c"] {
            assert_eq!(header_identity(bad), None, "{bad}");
        }
    }

    fn compile_err(doc: &str) -> String {
        let v: Value = serde_json::from_str(doc).unwrap();
        compile_identity(Some(&v)).err().unwrap().to_string()
    }

    #[test]
    fn invalid_sections_name_the_field() {
        let key = "a".repeat(64);
        let cases = [
            (r#"{"source":"pod"}"#.to_string(), "identity.source: unknown source \"pod\""),
            (r#"{"source":"trusted_header"}"#.into(), "identity.header: is required"),
            (r#"{"source":"trusted_header","header":"bad header"}"#.into(), "identity.header: \"bad header\" is not a valid header name"),
            (r#"{"source":"mesh_node","header":"x-a"}"#.into(), "identity.header: only applies"),
            (r#"{"source":"virtual_key"}"#.into(), "identity.virtual_keys: the virtual_key source needs"),
            (r#"{"source":"virtual_key","virtual_keys":[{"name":"k","sha256":"abc","namespace":"a","service":"b"}]}"#.into(), "identity.virtual_keys[0].sha256: must be"),
            (format!(r#"{{"source":"virtual_key","virtual_keys":[{{"name":"k","sha256":"{key}","namespace":"A","service":"b"}}]}}"#), "identity.virtual_keys[0].namespace"),
            (format!(r#"{{"source":"virtual_key","virtual_keys":[{{"name":"k","sha256":"{key}","namespace":"a","service":"b"}},{{"name":"k2","sha256":"{key}","namespace":"a","service":"b"}}]}}"#), "identity.virtual_keys[1].sha256: the same key"),
            (r#"{"source":"mesh_peer","default":{"namespace":"a"}}"#.into(), "identity: missing field `service`"),
            (r#"{"source":"mesh_peer","extra":1}"#.into(), "identity: unknown field `extra`"),
        ];
        for (doc, want) in cases {
            let got = compile_err(&doc);
            assert!(got.starts_with(want), "{doc}\n got: {got}\nwant: {want}");
        }
    }
}
