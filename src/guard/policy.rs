//! The `guardrails` section: named rules, each one check with one action,
//! compiled once, and the rules every caller gets unless its namespace
//! names its own (`namespaces.<ns>.guardrails`).

use std::collections::HashMap;
use std::fmt;

use serde_json::{Map, Value};

use crate::config::error::ConfigError;
use crate::config::names::valid_model_name;
use crate::guard::detect::{Matcher, Pii};

/// What a rule does with what it finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Refuse the request (or end the answer) in the caller's API shape.
    Block,
    /// Mask what was found and go on.
    Redact,
    /// Go on; count and log the finding.
    Flag,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Block => "block",
            Action::Redact => "redact",
            Action::Flag => "flag",
        }
    }
}

/// What a rule looks for.
pub enum Check {
    /// Personal data, secrets, keywords and regexes: findings in the text.
    Match(Matcher),
    /// The prompt-injection screen's score at or above the threshold.
    Injection { threshold: f64 },
    /// Topics by keyword sets: a denied topic mentioned, or none of the
    /// allowed ones.
    Topics {
        denied: Vec<(String, Matcher)>,
        allowed: Vec<(String, Matcher)>,
    },
    /// A team's own classifier, asked over HTTP.
    External(External),
}

/// An external guardrail: where it is and what to do without an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct External {
    /// The Envoy cluster that reaches it.
    pub cluster: String,
    pub authority: String,
    pub path: String,
    pub timeout_ms: u64,
    /// Without an answer in time (or with an unreadable one) the request
    /// goes on (`true`) or is refused with 503 (`false`).
    pub fail_open: bool,
}

impl fmt::Debug for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Check::Match(_) => write!(f, "Match"),
            Check::Injection { threshold } => write!(f, "Injection({threshold})"),
            Check::External(e) => write!(f, "External({} {})", e.cluster, e.path),
            Check::Topics { denied, allowed } => {
                let names = |t: &[(String, Matcher)]| {
                    t.iter()
                        .map(|(n, _)| n.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                };
                write!(
                    f,
                    "Topics(denied {}; allowed {})",
                    names(denied),
                    names(allowed)
                )
            }
        }
    }
}

/// One compiled rule.
#[derive(Debug)]
pub struct GuardRule {
    pub name: String,
    pub action: Action,
    /// Screens requests before they leave the mesh.
    pub on_request: bool,
    /// Screens answers, streamed ones as they flow.
    pub on_response: bool,
    pub check: Check,
}

/// The compiled section.
#[derive(Debug, Default)]
pub struct Guardrails {
    /// Shared with the streams that screen answers as they flow.
    pub rules: std::rc::Rc<Vec<GuardRule>>,
    /// Indices of the rules callers get unless their namespace says.
    pub default: Vec<usize>,
    by_name: HashMap<String, usize>,
}

impl Guardrails {
    pub fn index(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// The rules of `list` (indices into `rules`) that `keep` keeps.
    pub fn select(&self, list: &[usize], keep: impl Fn(&GuardRule) -> bool) -> Vec<usize> {
        list.iter()
            .copied()
            .filter(|&i| self.rules.get(i).is_some_and(&keep))
            .collect()
    }
}

impl GuardRule {
    pub fn is_external(&self) -> bool {
        matches!(self.check, Check::External(_))
    }
}

const SECTION_FIELDS: &[&str] = &["rules", "default"];
const RULE_FIELDS: &[&str] = &[
    "name",
    "action",
    "on",
    "pii",
    "secrets",
    "keywords",
    "regexes",
    "prompt_injection",
    "denied_topics",
    "allowed_topics",
    "external",
];

fn unknown(at: &str, key: &str, known: &[&str]) -> ConfigError {
    ConfigError::new(
        format!("{at}.{key}"),
        format!("unknown field (expected one of: {})", known.join(", ")),
    )
}

fn strings(at: &str, value: &Value) -> Result<Vec<String>, ConfigError> {
    let list = value
        .as_array()
        .ok_or_else(|| ConfigError::new(at, "must be an array of strings"))?;
    list.iter()
        .enumerate()
        .map(|(i, v)| match v.as_str() {
            Some(s) if !s.trim().is_empty() => Ok(s.to_string()),
            _ => Err(ConfigError::new(
                format!("{at}[{i}]"),
                "must be a non-empty string",
            )),
        })
        .collect()
}

/// `guardrails`: None when absent.
pub fn compile_guardrails(value: Option<&Value>) -> Result<Guardrails, ConfigError> {
    let Some(value) = value else {
        return Ok(Guardrails::default());
    };
    let obj = value
        .as_object()
        .ok_or_else(|| ConfigError::new("guardrails", "must be an object"))?;
    if let Some(key) = obj.keys().find(|k| !SECTION_FIELDS.contains(&k.as_str())) {
        return Err(unknown("guardrails", key, SECTION_FIELDS));
    }
    let list = obj
        .get("rules")
        .and_then(Value::as_array)
        .ok_or_else(|| ConfigError::new("guardrails.rules", "must be an array of rules"))?;
    let mut out = Guardrails::default();
    let mut rules = Vec::with_capacity(list.len());
    for (i, rule) in list.iter().enumerate() {
        let at = format!("guardrails.rules[{i}]");
        let rule = compile_rule(&at, rule)?;
        if out.by_name.insert(rule.name.clone(), i).is_some() {
            return Err(ConfigError::new(
                format!("{at}.name"),
                format!("{:?} names another rule already", rule.name),
            ));
        }
        rules.push(rule);
    }
    out.rules = std::rc::Rc::new(rules);
    out.default = match obj.get("default") {
        None => (0..out.rules.len()).collect(),
        Some(v) => rule_list("guardrails.default", v, &|n| out.index(n))?,
    };
    Ok(out)
}

/// A list of rule names, as indices (the section's `default`, or a
/// namespace's own list).
pub fn rule_list(
    at: &str,
    value: &Value,
    index: &dyn Fn(&str) -> Option<usize>,
) -> Result<Vec<usize>, ConfigError> {
    let names = strings(at, value).or_else(|e| match value.as_array() {
        Some(a) if a.is_empty() => Ok(Vec::new()),
        _ => Err(e),
    })?;
    names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            index(n).ok_or_else(|| {
                ConfigError::new(
                    format!("{at}[{i}]"),
                    format!("{n:?} is not a rule of guardrails.rules"),
                )
            })
        })
        .collect()
}

fn compile_rule(at: &str, value: &Value) -> Result<GuardRule, ConfigError> {
    let obj: &Map<String, Value> = value
        .as_object()
        .ok_or_else(|| ConfigError::new(at, "must be an object"))?;
    if let Some(key) = obj.keys().find(|k| !RULE_FIELDS.contains(&k.as_str())) {
        return Err(unknown(at, key, RULE_FIELDS));
    }
    let name = match obj.get("name").and_then(Value::as_str) {
        Some(n) if valid_model_name(n) && !n.contains(['/', ':', ',', ';']) => n.to_string(),
        _ => {
            return Err(ConfigError::new(
                format!("{at}.name"),
                "is required: letters, digits, '-', '_', '.'",
            ))
        }
    };
    let action = match obj.get("action").and_then(Value::as_str) {
        Some("block") => Action::Block,
        Some("redact") => Action::Redact,
        Some("flag") => Action::Flag,
        _ => {
            return Err(ConfigError::new(
                format!("{at}.action"),
                "is required: block, redact or flag",
            ))
        }
    };
    let matching = ["pii", "secrets", "keywords", "regexes"];
    let kinds = [
        matching.iter().any(|k| obj.contains_key(*k)),
        obj.contains_key("prompt_injection"),
        obj.contains_key("denied_topics") || obj.contains_key("allowed_topics"),
        obj.contains_key("external"),
    ];
    if kinds.iter().filter(|k| **k).count() != 1 {
        return Err(ConfigError::new(
            at,
            "needs exactly one kind of check: pii/secrets/keywords/regexes, prompt_injection, \
             denied_topics/allowed_topics, or external",
        ));
    }
    let check = if kinds[3] {
        Check::External(compile_external(
            &format!("{at}.external"),
            &name,
            obj.get("external").unwrap_or(&Value::Null),
        )?)
    } else if kinds[0] {
        Check::Match(compile_matcher(at, obj)?)
    } else if kinds[1] {
        Check::Injection {
            threshold: compile_threshold(
                &format!("{at}.prompt_injection"),
                obj.get("prompt_injection").unwrap_or(&Value::Null),
            )?,
        }
    } else {
        Check::Topics {
            denied: compile_topics(&format!("{at}.denied_topics"), obj.get("denied_topics"))?,
            allowed: compile_topics(&format!("{at}.allowed_topics"), obj.get("allowed_topics"))?,
        }
    };
    if action == Action::Redact && !matches!(check, Check::Match(_) | Check::External(_)) {
        return Err(ConfigError::new(
            format!("{at}.action"),
            "redact applies to pii, secrets, keywords and regexes only (what else would be \
             masked?): use block or flag",
        ));
    }
    // What the check reads: text found anywhere by default; injections and
    // topics are about what callers ask.
    let (on_request, on_response) = match obj.get("on") {
        None if matches!(check, Check::Match(_)) => (true, true),
        None => (true, false),
        Some(v) => {
            let sides = strings(&format!("{at}.on"), v)?;
            let mut sides_seen = (false, false);
            for (i, s) in sides.iter().enumerate() {
                match s.as_str() {
                    "request" => sides_seen.0 = true,
                    "response" => sides_seen.1 = true,
                    _ => {
                        return Err(ConfigError::new(
                            format!("{at}.on[{i}]"),
                            "must be request or response",
                        ))
                    }
                }
            }
            sides_seen
        }
    };
    if !on_request && !on_response {
        return Err(ConfigError::new(
            format!("{at}.on"),
            "must name request, response or both",
        ));
    }
    Ok(GuardRule {
        name,
        action,
        on_request,
        on_response,
        check,
    })
}

fn compile_matcher(at: &str, obj: &Map<String, Value>) -> Result<Matcher, ConfigError> {
    let pii = match obj.get("pii") {
        None => Vec::new(),
        Some(Value::Bool(true)) => Pii::ALL.to_vec(),
        Some(v) => {
            let names = strings(&format!("{at}.pii"), v)?;
            let mut out = Vec::new();
            for (i, n) in names.iter().enumerate() {
                out.push(Pii::from_name(n).ok_or_else(|| {
                    let all: Vec<&str> = Pii::ALL.iter().map(|p| p.name()).collect();
                    ConfigError::new(
                        format!("{at}.pii[{i}]"),
                        format!(
                            "{n:?} is not a detector (expected one of: {})",
                            all.join(", ")
                        ),
                    )
                })?);
            }
            out
        }
    };
    let secrets = match obj.get("secrets") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ConfigError::new(
                format!("{at}.secrets"),
                "must be a boolean",
            ))
        }
    };
    let keywords = obj
        .get("keywords")
        .map(|v| strings(&format!("{at}.keywords"), v))
        .transpose()?
        .unwrap_or_default();
    let regexes = obj
        .get("regexes")
        .map(|v| strings(&format!("{at}.regexes"), v))
        .transpose()?
        .unwrap_or_default();
    let matcher = Matcher::new(&pii, secrets, &keywords, &regexes)
        .map_err(|(i, e)| ConfigError::new(format!("{at}.regexes[{i}]"), e))?;
    if matcher.is_empty() {
        return Err(ConfigError::new(at, "looks for nothing"));
    }
    Ok(matcher)
}

fn compile_threshold(at: &str, value: &Value) -> Result<f64, ConfigError> {
    let obj = value
        .as_object()
        .ok_or_else(|| ConfigError::new(at, "must be an object: {\"threshold\": 0.5}"))?;
    if let Some(key) = obj.keys().find(|k| *k != "threshold") {
        return Err(unknown(at, key, &["threshold"]));
    }
    match obj.get("threshold") {
        None => Ok(DEFAULT_INJECTION_THRESHOLD),
        Some(v) => v.as_f64().filter(|t| *t > 0.0 && *t <= 1.0).ok_or_else(|| {
            ConfigError::new(format!("{at}.threshold"), "must be a number in (0, 1]")
        }),
    }
}

const EXTERNAL_FIELDS: &[&str] = &["url", "cluster", "timeout_ms", "on_failure"];

fn compile_external(at: &str, rule: &str, value: &Value) -> Result<External, ConfigError> {
    let obj = value
        .as_object()
        .ok_or_else(|| ConfigError::new(at, "must be an object with the classifier's url"))?;
    if let Some(key) = obj.keys().find(|k| !EXTERNAL_FIELDS.contains(&k.as_str())) {
        return Err(unknown(at, key, EXTERNAL_FIELDS));
    }
    let url = obj
        .get("url")
        .and_then(Value::as_str)
        .ok_or_else(|| ConfigError::new(format!("{at}.url"), "is required"))?;
    let parsed = crate::config::providers::BaseUrl::parse(url)
        .map_err(|e| ConfigError::new(format!("{at}.url"), e))?;
    let default_port = if parsed.tls { 443 } else { 80 };
    let authority = if parsed.port == default_port {
        parsed.host.clone()
    } else {
        format!("{}:{}", parsed.host, parsed.port)
    };
    let cluster = match obj.get("cluster") {
        None => format!("guardrail-{rule}"),
        Some(Value::String(c)) if !c.is_empty() => c.clone(),
        Some(_) => {
            return Err(ConfigError::new(
                format!("{at}.cluster"),
                "must be a cluster name",
            ))
        }
    };
    let timeout_ms = match obj.get("timeout_ms") {
        None => DEFAULT_EXTERNAL_TIMEOUT_MS,
        Some(v) => v
            .as_u64()
            .filter(|t| (1..=60_000).contains(t))
            .ok_or_else(|| {
                ConfigError::new(
                    format!("{at}.timeout_ms"),
                    "must be a whole number from 1 to 60000",
                )
            })?,
    };
    let fail_open = match obj.get("on_failure").map(|v| v.as_str()) {
        None | Some(Some("closed")) => false,
        Some(Some("open")) => true,
        Some(_) => {
            return Err(ConfigError::new(
                format!("{at}.on_failure"),
                "must be open or closed",
            ))
        }
    };
    Ok(External {
        cluster,
        authority,
        path: if parsed.path.is_empty() {
            "/".into()
        } else {
            parsed.path
        },
        timeout_ms,
        fail_open,
    })
}

/// How long a request waits for an external guardrail by default.
pub const DEFAULT_EXTERNAL_TIMEOUT_MS: u64 = 500;

/// The score at which a prompt counts as an injection attempt by default.
pub const DEFAULT_INJECTION_THRESHOLD: f64 = 0.5;

fn compile_topics(at: &str, value: Option<&Value>) -> Result<Vec<(String, Matcher)>, ConfigError> {
    let Some(value) = value else {
        return Ok(Vec::new());
    };
    let obj = value
        .as_object()
        .ok_or_else(|| ConfigError::new(at, "must be an object of topic -> keywords"))?;
    obj.iter()
        .map(|(topic, words)| {
            let tat = format!("{at}.{topic}");
            let words = strings(&tat, words)?;
            if words.is_empty() {
                return Err(ConfigError::new(tat, "needs at least one keyword"));
            }
            let m = Matcher::new(&[], false, &words, &[])
                .map_err(|(_, e)| ConfigError::new(&tat, e))?;
            Ok((topic.clone(), m))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(v: Value) -> String {
        compile_guardrails(Some(&v)).unwrap_err().to_string()
    }

    #[test]
    fn compiles_rules_with_their_defaults() {
        let g = compile_guardrails(Some(&json!({"rules": [
            {"name": "pii", "pii": ["email", "payment_card"], "action": "redact"},
            {"name": "secrets", "secrets": true, "action": "block", "on": ["request"]},
            {"name": "inj", "prompt_injection": {"threshold": 0.7}, "action": "block"},
            {"name": "topics", "denied_topics": {"medical": ["diagnosis"]}, "action": "flag"},
        ], "default": ["pii", "secrets"]})))
        .unwrap();
        assert_eq!(g.rules.len(), 4);
        assert_eq!(g.default, [0, 1]);
        assert!(g.rules[0].on_request && g.rules[0].on_response);
        assert!(g.rules[1].on_request && !g.rules[1].on_response);
        assert!(g.rules[2].on_request && !g.rules[2].on_response);
        assert!(matches!(g.rules[2].check, Check::Injection { threshold } if threshold == 0.7));
        assert_eq!(g.index("topics"), Some(3));
        let all = compile_guardrails(Some(&json!({"rules": [
            {"name": "a", "keywords": ["x"], "action": "flag"}]})))
        .unwrap();
        assert_eq!(all.default, [0]);
    }

    #[test]
    fn mistakes_name_their_field() {
        for (doc, want) in [
            (json!({"rulez": []}), "guardrails.rulez: unknown field"),
            (
                json!({"rules": [{"name": "a", "action": "block"}]}),
                "guardrails.rules[0]: needs exactly one kind",
            ),
            (
                json!({"rules": [{"name": "a", "pii": ["dna"], "action": "block"}]}),
                "guardrails.rules[0].pii[0]: \"dna\" is not a detector",
            ),
            (
                json!({"rules": [{"name": "a", "keywords": ["x"], "action": "hide"}]}),
                "guardrails.rules[0].action",
            ),
            (
                json!({"rules": [{"name": "a", "keywords": ["x"], "action": "flag", "on": ["both"]}]}),
                "guardrails.rules[0].on[0]",
            ),
            (
                json!({"rules": [{"name": "a", "prompt_injection": {}, "action": "redact"}]}),
                "guardrails.rules[0].action: redact applies",
            ),
            (
                json!({"rules": [{"name": "a", "prompt_injection": {"threshold": 2}, "action": "block"}]}),
                "guardrails.rules[0].prompt_injection.threshold",
            ),
            (
                json!({"rules": [{"name": "a", "keywords": ["x"], "action": "flag"}, {"name": "a", "secrets": true, "action": "flag"}]}),
                "guardrails.rules[1].name",
            ),
            (
                json!({"rules": [{"name": "a", "keywords": ["x"], "action": "flag"}], "default": ["b"]}),
                "guardrails.default[0]: \"b\" is not a rule",
            ),
            (
                json!({"rules": [{"name": "a", "regexes": ["(unclosed"], "action": "flag"}]}),
                "guardrails.rules[0].regexes[0]",
            ),
            (
                json!({"rules": [{"name": "a", "denied_topics": {"t": []}, "action": "flag"}]}),
                "guardrails.rules[0].denied_topics.t",
            ),
            (
                json!({"rules": [{"name": "a", "secrets": false, "action": "flag"}]}),
                "guardrails.rules[0]: looks for nothing",
            ),
        ] {
            let got = err(doc.clone());
            assert!(got.starts_with(want), "{doc}: {got}");
        }
    }
}
