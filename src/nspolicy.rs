//! Namespace policies: which public names a caller may use, extra names
//! (aliases) for one namespace's callers, and quota rules that apply to that
//! namespace on top of the mesh's own.
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
//! rules; the mesh's quota rules apply whatever the source. Everything is
//! compiled once: the document's policies in `on_configure`, a listener's
//! policy the first time its bytes are seen (a small per-VM cache).

use std::cell::{Cell, RefCell};
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::rc::Rc;

use serde_json::Value;

use crate::config::error::ConfigError;
use crate::config::names::{valid_model_name, Target};
use crate::config::Config;
use crate::core::api_error::ApiError;
use crate::host::SharedData;
use crate::identity::{valid_segment, Caller};
use crate::limits::{compile_rule, Known, LimitRule, Selector};

/// Where the listener half finds a namespace policy in the proxy's listener
/// metadata (verified in Envoy 1.40; without the `xds` prefix there is none).
pub const LISTENER_POLICY_PATH: &[&str] = &[
    "xds",
    "listener_metadata",
    "filter_metadata",
    "meshllm",
    "policy",
];
/// How errors in a listener policy name their fields.
pub const LISTENER_AT: &str = "meshllm.policy";

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

/// One namespace's policy, compiled.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct NamespacePolicy {
    pub namespace: String,
    /// Replaces the mesh allow-list; None: the mesh list applies.
    pub allowed: Option<HashSet<Target>>,
    /// Per-service lists, replacing the namespace's (or the mesh's).
    pub services: HashMap<String, HashSet<Target>>,
    /// Alias -> public name of the document, sorted (listing order).
    pub aliases: BTreeMap<String, String>,
    /// Rules added to the mesh's; named `<namespace>/<rule>`.
    pub rules: Vec<Rc<LimitRule>>,
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

/// How many distinct listener policies one VM keeps compiled (a rollout
/// briefly serves the old and the new listener side by side; a gateway
/// serves several namespaces).
const CACHE_ENTRIES: usize = 8;
/// How many distinct listener values are remembered as already logged.
const LOGGED_VALUES: usize = 1024;

type Compiled = Result<Rc<NamespacePolicy>, Rc<str>>;

/// Listener policies compiled per (namespace, bytes), most recent first.
/// It lives in the `Config` of one VM (single-threaded), so a new
/// configuration starts with an empty cache.
#[derive(Default)]
pub struct ListenerCache {
    entries: RefCell<Vec<(String, Vec<u8>, Compiled)>>,
    logged: RefCell<HashSet<u64>>,
    compiles: Cell<u64>,
}

impl std::fmt::Debug for ListenerCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ListenerCache({} compiles)", self.compiles.get())
    }
}

impl ListenerCache {
    /// How many times a listener policy was compiled (tests).
    pub fn compiles(&self) -> u64 {
        self.compiles.get()
    }

    /// Whether this is the first time `value` is reported (then it is
    /// remembered, up to a bound).
    fn first_report(&self, namespace: &str, bytes: &[u8]) -> bool {
        let mut h = DefaultHasher::new();
        (namespace, bytes).hash(&mut h);
        let mut logged = self.logged.borrow_mut();
        if logged.contains(&h.finish()) {
            return false;
        }
        if logged.len() < LOGGED_VALUES {
            logged.insert(h.finish());
        }
        true
    }
}

fn listener_policy(
    config: &Config,
    namespace: &str,
    bytes: Vec<u8>,
    store: &mut dyn SharedData,
) -> Result<Rc<NamespacePolicy>, Rc<str>> {
    let cache = &config.listener_policies;
    {
        let mut entries = cache.entries.borrow_mut();
        if let Some(i) = entries
            .iter()
            .position(|(ns, b, _)| ns == namespace && *b == bytes)
        {
            let entry = entries.remove(i);
            let compiled = entry.2.clone();
            entries.insert(0, entry);
            return compiled;
        }
    }
    cache.compiles.set(cache.compiles.get() + 1);
    let compiled: Compiled = compile_listener(namespace, &bytes, config)
        .map(Rc::new)
        .map_err(|e| Rc::from(e.to_string()));
    let first = cache.first_report(namespace, &bytes);
    match &compiled {
        Ok(policy) => {
            for rule in &policy.rules {
                for key in rule.known_buckets(config.models.iter().map(|m| m.name.as_str())) {
                    crate::quota::ensure(store, &key);
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
    let mut entries = cache.entries.borrow_mut();
    entries.insert(0, (namespace.to_string(), bytes, compiled.clone()));
    entries.truncate(CACHE_ENTRIES);
    compiled
}

/// A listener policy: the same schema as one `namespaces` entry.
pub fn compile_listener(
    namespace: &str,
    bytes: &[u8],
    config: &Config,
) -> Result<NamespacePolicy, ConfigError> {
    if config.identity.is_none() {
        return Err(ConfigError::new(
            LISTENER_AT,
            "a namespace policy needs an `identity` section in the configuration",
        ));
    }
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        ConfigError::new(
            LISTENER_AT,
            format!("must be a string holding a JSON object (a namespace policy): {e}"),
        )
    })?;
    compile_namespace(LISTENER_AT, namespace, &value, config)
}

/// `namespaces`: namespace name -> policy. Needs `identity`.
pub fn compile_namespaces(
    value: Option<&Value>,
    config: &Config,
) -> Result<HashMap<String, Rc<NamespacePolicy>>, ConfigError> {
    let Some(value) = value else {
        return Ok(HashMap::new());
    };
    if config.identity.is_none() {
        return Err(ConfigError::new(
            "namespaces",
            "needs an `identity` section (how callers' namespaces are known)",
        ));
    }
    let map = value.as_object().ok_or_else(|| {
        ConfigError::new(
            "namespaces",
            "must be an object of namespace name -> policy",
        )
    })?;
    let mut out = HashMap::with_capacity(map.len());
    for (ns, v) in map {
        let at = format!("namespaces.{ns}");
        if !valid_segment(ns) {
            return Err(ConfigError::new(
                at,
                format!("{ns:?} is not a valid namespace name (lowercase letters, digits, '-', '.', '_')"),
            ));
        }
        out.insert(ns.clone(), Rc::new(compile_namespace(&at, ns, v, config)?));
    }
    Ok(out)
}

const POLICY_FIELDS: &[&str] = &["allowed_models", "aliases", "services", "quotas"];

/// One namespace policy at `at` (a `namespaces` entry or a listener's).
pub fn compile_namespace(
    at: &str,
    namespace: &str,
    value: &Value,
    config: &Config,
) -> Result<NamespacePolicy, ConfigError> {
    let obj = value
        .as_object()
        .ok_or_else(|| ConfigError::new(at, "must be an object"))?;
    for key in obj.keys() {
        if !POLICY_FIELDS.contains(&key.as_str()) {
            return Err(ConfigError::new(
                format!("{at}.{key}"),
                format!(
                    "unknown field (expected one of: {})",
                    POLICY_FIELDS.join(", ")
                ),
            ));
        }
    }
    let aliases = compile_aliases(&format!("{at}.aliases"), obj.get("aliases"), config)?;
    let lookup = |name: &str| {
        config
            .target(name)
            .or_else(|| config.target(aliases.get(name)?))
    };
    let allowed = obj
        .get("allowed_models")
        .map(|v| compile_allowed(&format!("{at}.allowed_models"), v, &lookup))
        .transpose()?;
    let mut services = HashMap::new();
    if let Some(v) = obj.get("services") {
        let sat = format!("{at}.services");
        let map = v.as_object().ok_or_else(|| {
            ConfigError::new(
                &sat,
                "must be an object of service name -> {\"allowed_models\": [...]}",
            )
        })?;
        for (svc, entry) in map {
            let eat = format!("{sat}.{svc}");
            if !valid_segment(svc) {
                return Err(ConfigError::new(
                    eat,
                    format!("{svc:?} is not a valid service name"),
                ));
            }
            let entry = entry
                .as_object()
                .ok_or_else(|| ConfigError::new(&eat, "must be an object"))?;
            if let Some(key) = entry.keys().find(|k| *k != "allowed_models") {
                return Err(ConfigError::new(
                    format!("{eat}.{key}"),
                    "unknown field (expected: allowed_models)",
                ));
            }
            let list = entry
                .get("allowed_models")
                .ok_or_else(|| ConfigError::new(format!("{eat}.allowed_models"), "is required"))?;
            services.insert(
                svc.clone(),
                compile_allowed(&format!("{eat}.allowed_models"), list, &lookup)?,
            );
        }
    }
    let rules = compile_rules(at, namespace, obj.get("quotas"), config, &aliases, &lookup)?;
    Ok(NamespacePolicy {
        namespace: namespace.to_string(),
        allowed,
        services,
        aliases,
        rules,
    })
}

fn compile_aliases(
    at: &str,
    value: Option<&Value>,
    config: &Config,
) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut aliases = BTreeMap::new();
    let Some(value) = value else {
        return Ok(aliases);
    };
    let map = value
        .as_object()
        .ok_or_else(|| ConfigError::new(at, "must be an object of alias -> public name"))?;
    for (alias, target) in map {
        let fat = format!("{at}.{alias}");
        if !valid_model_name(alias) {
            return Err(ConfigError::new(
                fat,
                format!("{alias:?} is not a valid model name"),
            ));
        }
        if config.target(alias).is_some() {
            return Err(ConfigError::new(
                fat,
                format!(
                    "{alias:?} is already a public name of the configuration; an alias must be \
                     a new name"
                ),
            ));
        }
        let target = target
            .as_str()
            .ok_or_else(|| ConfigError::new(&fat, "must be a public name (a string)"))?;
        if config.target(target).is_none() {
            return Err(ConfigError::new(
                fat,
                format!("{target:?} is not a model, alias or route of the configuration"),
            ));
        }
        aliases.insert(alias.clone(), target.to_string());
    }
    Ok(aliases)
}

/// An allow-list: public names, each compiled to what it denotes.
pub fn compile_allowed(
    at: &str,
    value: &Value,
    lookup: &dyn Fn(&str) -> Option<Target>,
) -> Result<HashSet<Target>, ConfigError> {
    let list = value
        .as_array()
        .ok_or_else(|| ConfigError::new(at, "must be an array of public model names"))?;
    let mut out = HashSet::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        let iat = format!("{at}[{i}]");
        let name = item
            .as_str()
            .ok_or_else(|| ConfigError::new(&iat, "must be a public model name (a string)"))?;
        let target = lookup(name).ok_or_else(|| {
            ConfigError::new(
                &iat,
                format!("{name:?} is not a model, alias or route of the configuration"),
            )
        })?;
        out.insert(target);
    }
    Ok(out)
}

/// `quotas.limits` of a namespace: the mesh's rule schema, `match.namespace`
/// implied, names prefixed with the namespace so buckets never collide.
fn compile_rules(
    at: &str,
    namespace: &str,
    value: Option<&Value>,
    config: &Config,
    aliases: &BTreeMap<String, String>,
    lookup: &dyn Fn(&str) -> Option<Target>,
) -> Result<Vec<Rc<LimitRule>>, ConfigError> {
    let Some(value) = value else {
        return Ok(Vec::new());
    };
    let qat = format!("{at}.quotas");
    let obj = value
        .as_object()
        .ok_or_else(|| ConfigError::new(&qat, "must be an object with `limits`"))?;
    if let Some(key) = obj.keys().find(|k| *k != "limits") {
        return Err(ConfigError::new(
            format!("{qat}.{key}"),
            "unknown field (expected: limits; reservation and alerts are the mesh's)",
        ));
    }
    let Some(limits) = obj.get("limits") else {
        return Ok(Vec::new());
    };
    let list = limits
        .as_array()
        .ok_or_else(|| ConfigError::new(format!("{qat}.limits"), "must be an array of rules"))?;
    // A rule keeps the document's name of what it names: an alias (the
    // namespace's or the document's) binds the model or route behind it.
    let is_model = |name: &str| {
        let target = lookup(name)?;
        Some((target, config.target_name(target).to_string()))
    };
    let is_key = |name: &str| config.identity.as_ref().is_some_and(|i| i.has_key(name));
    let known = Known {
        model: &is_model,
        virtual_key: &is_key,
        identity: true,
    };
    let resolve = |name: &str| {
        aliases
            .get(name)
            .cloned()
            .unwrap_or_else(|| name.to_string())
    };
    let mut rules: Vec<Rc<LimitRule>> = Vec::with_capacity(list.len());
    for (i, v) in list.iter().enumerate() {
        let rat = format!("{qat}.limits[{i}]");
        if let Some(ns) = v.pointer("/match/namespace") {
            if ns.as_str() != Some(namespace) {
                return Err(ConfigError::new(
                    format!("{rat}.match.namespace"),
                    format!(
                        "a namespace's rules apply to its own callers: leave it out or set {namespace:?}"
                    ),
                ));
            }
        }
        let mut rule = compile_rule(&rat, v, &config.tags, &known)?;
        rule.matcher.namespace = Selector::Is(namespace.to_string());
        if let Some(d) = &mut rule.downgrade {
            d.models = d
                .models
                .iter()
                .map(|(from, to)| (resolve(from), resolve(to)))
                .collect();
        }
        let name = format!("{namespace}/{}", rule.name);
        if rules.iter().any(|r| r.name == name) {
            return Err(ConfigError::new(
                format!("{rat}.name"),
                format!("{:?} is already the name of another limit", rule.name),
            ));
        }
        rule.name = name;
        rules.push(Rc::new(rule));
    }
    Ok(rules)
}

#[cfg(test)]
#[path = "nspolicy_tests.rs"]
mod tests;
