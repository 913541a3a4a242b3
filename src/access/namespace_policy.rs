//! Which namespace policy applies to a request, and what it lets the
//! caller use. The policies themselves are compiled with the configuration
//! (`config::namespaces`).
//!
//! For a caller in namespace N the policy is, first found wins:
//!
//! | source     | where                                                   |
//! |------------|---------------------------------------------------------|
//! | `listener` | the proxy's listener metadata `filter_metadata.meshllm.policy` (a JSON string) |
//! | `namespace`| `namespaces.N` in the plugin configuration              |
//! | `mesh`     | the top level: `allowed_models` (and `quotas` always)   |
//!
//! A namespace policy replaces the mesh allow-list for its callers (a
//! service's own list replaces the namespace's), adds aliases, and adds quota
//! rules; the mesh's quota rules apply whatever the source.

use std::collections::HashSet;
use std::rc::Rc;

use crate::access::identity::Caller;
use crate::config::names::Target;
use crate::config::namespaces::{compile_listener, ListenerPolicy, NamespacePolicy, LISTENER_AT};
use crate::config::Config;
use crate::core::api_error::ApiError;
use crate::host::SharedData;
use crate::quota::limits::LimitRule;

/// Where the listener half finds a namespace policy in the proxy's listener
/// metadata (verified in Envoy 1.40; without the `xds` prefix there is none).
pub const LISTENER_POLICY_PATH: &[&str] = &[
    "xds",
    "listener_metadata",
    "filter_metadata",
    "meshllm",
    "policy",
];

/// Which level of policy applies to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Source {
    #[default]
    Mesh,
    Namespace,
    Listener,
}

impl Source {
    /// As the access log shows it.
    pub fn name(self) -> &'static str {
        match self {
            Source::Mesh => "mesh",
            Source::Namespace => "namespace",
            Source::Listener => "listener",
        }
    }
}

/// The policy that applies to one request.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    pub source: Source,
    policy: Option<Rc<NamespacePolicy>>,
    service: Option<String>,
}

impl Applied {
    /// The document's name for `name`: a namespace alias's target, or itself.
    pub fn resolve<'a>(&'a self, name: &'a str) -> &'a str {
        self.policy
            .as_ref()
            .and_then(|p| p.aliases.get(name))
            .map_or(name, String::as_str)
    }

    /// The guardrail rules this caller gets: its namespace's list, else
    /// the configured default.
    pub fn guardrails<'a>(&'a self, config: &'a Config) -> &'a [usize] {
        match self.policy.as_ref().and_then(|p| p.guardrails.as_ref()) {
            Some(list) => list,
            None => &config.guardrails.default,
        }
    }

    /// Whether the caller's namespace turns the cache on or off; None:
    /// `cache.default` decides.
    pub fn cache(&self) -> Option<bool> {
        self.policy.as_ref().and_then(|p| p.cache)
    }

    /// What `name` denotes for this caller (namespace aliases included).
    pub fn target(&self, config: &Config, name: &str) -> Option<Target> {
        config.target(self.resolve(name))
    }

    /// The allow-list in force: the service's, the namespace's, the mesh's;
    /// None when every public name is allowed.
    fn allow_list<'a>(&'a self, config: &'a Config) -> Option<&'a HashSet<Target>> {
        if let Some(p) = &self.policy {
            if let Some(list) = self.service.as_ref().and_then(|s| p.services.get(s)) {
                return Some(list);
            }
            if let Some(list) = &p.allowed {
                return Some(list);
            }
        }
        config.allowed_models.as_ref()
    }

    /// Whether the caller may use `target`.
    pub fn allows(&self, config: &Config, target: Target) -> bool {
        self.allow_list(config)
            .is_none_or(|list| list.contains(&target))
    }

    /// Whether `name` is a known name this caller may not use.
    pub fn refuses(&self, config: &Config, name: &str) -> bool {
        self.target(config, name)
            .is_some_and(|t| !self.allows(config, t))
    }

    /// Quota rules added to the mesh's.
    pub fn rules(&self) -> &[Rc<LimitRule>] {
        self.policy.as_ref().map_or(&[], |p| p.rules.as_slice())
    }

    /// Whether listings differ from the document's full list.
    pub fn restricts(&self, config: &Config) -> bool {
        self.policy.is_some() || config.allowed_models.is_some()
    }

    /// The names this caller may use, with what they denote: the
    /// document's in configuration order, then the namespace's aliases.
    pub fn visible<'a>(&'a self, config: &'a Config) -> Vec<(&'a str, Target)> {
        let aliases = self.policy.iter().flat_map(|p| {
            p.aliases
                .iter()
                .filter_map(|(a, t)| Some((a.as_str(), config.target(t)?)))
        });
        config
            .public_targets()
            .chain(aliases)
            .filter(|(_, t)| self.allows(config, *t))
            .collect()
    }
}

/// The policy for a caller: listener metadata (`listener`, its raw bytes)
/// first, then the document's namespace entry, then the mesh. An invalid
/// listener policy fails closed: 500 `invalid_namespace_policy`.
pub fn apply(
    config: &Config,
    store: &mut dyn SharedData,
    caller: Option<&Caller>,
    listener: Option<Vec<u8>>,
) -> Result<Applied, ApiError> {
    let listener = listener.filter(|b| !b.trim_ascii().is_empty());
    let Some(caller) = caller else {
        if listener.is_some() && config.identity.is_none() {
            return Err(invalid_policy(&format!(
                "{LISTENER_AT}: a namespace policy needs an `identity` section in the \
                 configuration (callers' namespaces are not known)"
            )));
        }
        return Ok(Applied::default());
    };
    let service = Some(caller.service.clone());
    if let Some(bytes) = listener {
        let policy = listener_policy(config, &caller.namespace, bytes, store)
            .map_err(|e| invalid_policy(&e))?;
        return Ok(Applied {
            source: Source::Listener,
            policy: Some(policy),
            service,
        });
    }
    match config.namespaces.get(&caller.namespace) {
        Some(p) => Ok(Applied {
            source: Source::Namespace,
            policy: Some(Rc::clone(p)),
            service,
        }),
        None => Ok(Applied::default()),
    }
}

fn invalid_policy(detail: &str) -> ApiError {
    ApiError::new(
        500,
        "server_error",
        Some("invalid_namespace_policy"),
        format!(
            "The namespace policy in this proxy's listener metadata is invalid, so the gateway \
             refuses requests until it is fixed: {detail}."
        ),
    )
}

fn listener_policy(
    config: &Config,
    namespace: &str,
    bytes: Vec<u8>,
    store: &mut dyn SharedData,
) -> ListenerPolicy {
    let cache = &config.listener_policies;
    if let Some(compiled) = cache.cached(namespace, &bytes) {
        return compiled;
    }
    let compiled: ListenerPolicy = compile_listener(namespace, &bytes, config)
        .map(Rc::new)
        .map_err(|e| Rc::from(e.to_string()));
    let first = cache.first_report(namespace, &bytes);
    match &compiled {
        Ok(policy) => {
            for rule in &policy.rules {
                for key in rule.known_buckets(config.models.iter().map(|m| m.name.as_str())) {
                    crate::quota::buckets::ensure(store, &key);
                }
            }
            if first {
                log::info!(
                    "namespace policy from listener metadata for namespace {namespace:?}: \
                     {} aliases, {} quota rules, allow-list {}",
                    policy.aliases.len(),
                    policy.rules.len(),
                    if policy.allowed.is_some() {
                        "set"
                    } else {
                        "inherited"
                    },
                );
            }
        }
        Err(e) if first => log::error!(
            "invalid namespace policy in listener metadata for namespace {namespace:?} \
             (requests of its callers get 500 until it is fixed): {e}"
        ),
        Err(_) => {}
    }
    cache.remember(namespace, bytes, compiled.clone());
    compiled
}

#[cfg(test)]
#[path = "namespace_policy_tests.rs"]
mod tests;
