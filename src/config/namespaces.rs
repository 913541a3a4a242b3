//! The `namespaces` section, and namespace policies from listener metadata
//! (the same schema): for one namespace's callers, the public names they
//! may use, extra names (aliases), and quota rules on top of the mesh's own.
//! Each is compiled against the document's public names, once: the
//! document's in `on_configure`, a listener's the first time its bytes are
//! seen (a small per-VM cache, kept here). Which policy applies to a request
//! is `access::namespace_policy`.

use std::cell::{Cell, RefCell};
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::rc::Rc;

use serde_json::Value;

use crate::access::identity::{valid_segment, IdentityPolicy};
use crate::config::error::ConfigError;
use crate::config::names::{valid_model_name, Target};
use crate::quota::limits::{compile_rule, Known, LimitRule, Selector, Tag};

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
    /// The guardrail rules its callers get, replacing the default list;
    /// None: the default list applies.
    pub guardrails: Option<Vec<usize>>,
    /// Whether its callers' answers are cached; None: `cache.default`.
    pub cache: Option<bool>,
}

/// What a namespace policy is compiled against: the document's public
/// names, its identity section and its attribution tags. `Config` is one;
/// naming it through this trait keeps the section below `Config`, which
/// holds the compiled policies.
pub trait Document {
    /// What a public name of the document denotes.
    fn target(&self, name: &str) -> Option<Target>;
    /// The document's own name of what a public name denotes.
    fn target_name(&self, target: Target) -> &str;
    fn identity(&self) -> Option<&IdentityPolicy>;
    fn tags(&self) -> &[Tag];
    /// The shared store's default failure mode; None without a store.
    fn store_failure(&self) -> Option<crate::quota::store::FailureMode>;
    /// `quotas.store.lease.proxies`; None: shared rules stay exact by default.
    fn store_lease(&self) -> Option<u64>;
    /// A guardrail rule by name, as an index into the section's rules.
    fn guardrail(&self, name: &str) -> Option<usize>;
}

/// How errors in a listener policy name their fields.
pub const LISTENER_AT: &str = "meshllm.policy";

/// How many distinct listener policies one VM keeps compiled (a rollout
/// briefly serves the old and the new listener side by side; a gateway
/// serves several namespaces).
const CACHE_ENTRIES: usize = 8;
/// How many distinct listener values are remembered as already logged.
const LOGGED_VALUES: usize = 1024;

/// A listener policy as compiled: the policy, or why it is invalid.
pub type ListenerPolicy = Result<Rc<NamespacePolicy>, Rc<str>>;

/// Listener policies compiled per (namespace, bytes), most recent first.
/// It lives in the `Config` of one VM (single-threaded), so a new
/// configuration starts with an empty cache.
#[derive(Default)]
pub struct ListenerCache {
    entries: RefCell<Vec<(String, Vec<u8>, ListenerPolicy)>>,
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

    /// The policy compiled before for `bytes` in `namespace`, which
    /// becomes the most recent entry.
    pub fn cached(&self, namespace: &str, bytes: &[u8]) -> Option<ListenerPolicy> {
        let mut entries = self.entries.borrow_mut();
        let i = entries
            .iter()
            .position(|(ns, b, _)| ns == namespace && b == bytes)?;
        let entry = entries.remove(i);
        let compiled = entry.2.clone();
        entries.insert(0, entry);
        Some(compiled)
    }

    /// Keeps a policy just compiled (and counts the compile), dropping the
    /// least recent entry past the bound.
    pub fn remember(&self, namespace: &str, bytes: Vec<u8>, compiled: ListenerPolicy) {
        self.compiles.set(self.compiles.get() + 1);
        let mut entries = self.entries.borrow_mut();
        entries.insert(0, (namespace.to_string(), bytes, compiled));
        entries.truncate(CACHE_ENTRIES);
    }

    /// Whether this is the first time `value` is reported (then it is
    /// remembered, up to a bound).
    pub fn first_report(&self, namespace: &str, bytes: &[u8]) -> bool {
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

/// A listener policy: the same schema as one `namespaces` entry.
pub fn compile_listener(
    namespace: &str,
    bytes: &[u8],
    config: &dyn Document,
) -> Result<NamespacePolicy, ConfigError> {
    if config.identity().is_none() {
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
    config: &dyn Document,
) -> Result<HashMap<String, Rc<NamespacePolicy>>, ConfigError> {
    let Some(value) = value else {
        return Ok(HashMap::new());
    };
    if config.identity().is_none() {
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

const POLICY_FIELDS: &[&str] = &[
    "allowed_models",
    "aliases",
    "services",
    "quotas",
    "guardrails",
    "cache",
];

/// One namespace policy at `at` (a `namespaces` entry or a listener's).
pub fn compile_namespace(
    at: &str,
    namespace: &str,
    value: &Value,
    config: &dyn Document,
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
    let guardrails = obj
        .get("guardrails")
        .map(|v| {
            crate::guard::policy::rule_list(&format!("{at}.guardrails"), v, &|n| {
                config.guardrail(n)
            })
        })
        .transpose()?;
    let cache = obj
        .get("cache")
        .map(|v| {
            v.as_bool()
                .ok_or_else(|| ConfigError::new(format!("{at}.cache"), "must be true or false"))
        })
        .transpose()?;
    Ok(NamespacePolicy {
        namespace: namespace.to_string(),
        allowed,
        services,
        aliases,
        rules,
        guardrails,
        cache,
    })
}

fn compile_aliases(
    at: &str,
    value: Option<&Value>,
    config: &dyn Document,
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
    config: &dyn Document,
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
    let is_key = |name: &str| config.identity().is_some_and(|i| i.has_key(name));
    let known = Known {
        model: &is_model,
        virtual_key: &is_key,
        identity: true,
        store: config.store_failure(),
        store_lease: config.store_lease(),
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
        let mut rule = compile_rule(&rat, v, config.tags(), &known)?;
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
