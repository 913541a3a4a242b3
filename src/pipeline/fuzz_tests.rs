//! A deterministic fuzzer of both halves of the filter against the mock
//! host. The native build runs this code inside Envoy, where a panic takes
//! the proxy down, so every callback is driven with hostile and random
//! inputs: mutated requests in random chunks, forged headers, callbacks out
//! of order, mutated provider answers (JSON, SSE, AWS event-stream) split at
//! random points, callout answers for any id, failing host calls and lost
//! shared-data writes.
//!
//! No dependency: a splitmix64 generator, one seed per case, so a case is
//! its seed (for this version of the generator). `cargo test --lib fuzz`
//! runs 4000 random cases and a sweep of wrong types through the request
//! fixtures' fields; `MESHLLM_FUZZ_CASES=N cargo test --lib fuzz --
//! --ignored` runs the whole sweep and N more cases (`MESHLLM_FUZZ_SEED`
//! picks the first seed, to replay one case with `MESHLLM_FUZZ_CASES=1`).
//! A case that panics, or whose local reply breaks an invariant (a status
//! other than 200 or 400..=599, a body that is not JSON, a provider's key),
//! fails the test with its seed and its inputs.
//!
//! Header values are strings here as in the `Host` trait: a non-UTF-8
//! value reaches the filter as the glue's lossy conversion makes it, which
//! is what the generator sends.

use std::collections::BTreeSet;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::time::Instant;

use serde_json::{json, Value};

use crate::config::testing::{self, TEST_ENV};
use crate::config::Config;
use crate::host::mock::{MockHost, Op, Rival, Sent};
use crate::host::CalloutAnswer;
use crate::pipeline::handoff::{
    ANSWER_STATUS_PROPERTY, CLUSTER_HEADER, PLAN_PROPERTY, USAGE_PROPERTY,
};
use crate::pipeline::{Filter, Flow, Router};
use crate::providers::aws::eventstream::encode;

// ---------------------------------------------------------------------------
// The generator

/// splitmix64: tiny, fast and good enough to pick inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// Up to `max` random bytes.
    fn some_bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max + 1);
        self.bytes(n)
    }

    /// A short random text, sometimes with control and non-ASCII characters.
    fn text(&mut self, max: usize) -> String {
        const CHARS: &[char] = &[
            'a', 'Z', '0', '9', '-', '_', '/', '.', ':', ' ', '"', '\\', '\u{0}', '\u{7f}',
            '\u{1b}', '\t', '\r', '\n', 'é', '☕', '\u{fffd}', '%', '?', '#', '=', '&', ',', ';',
        ];
        let n = self.below(max + 1);
        (0..n).map(|_| *self.pick(CHARS)).collect()
    }
}

/// The seed of case `i` of a run that starts at `base`.
fn case_seed(base: u64, i: u64) -> u64 {
    Rng(base.wrapping_add(i)).next()
}

/// Bytes printed as escaped ASCII, so a reproduction can be pasted.
#[derive(Clone, Default)]
struct Bytes(Vec<u8>);

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "b\"{}\"", self.0.escape_ascii())
    }
}

// ---------------------------------------------------------------------------
// Configurations

/// Every provider kind, a cross-provider route, namespaces with aliases,
/// allow-lists, downgrades and local quotas; failover on.
const CONFIG_ROUTED: &str = r#"{
  "identity": {"source": "trusted_header", "header": "x-caller"},
  "failover": {"enabled": true, "max_attempts": 4},
  "providers": [
    {"name": "openai", "kind": "openai", "api_key_env": "OPENAI_API_KEY"},
    {"name": "azure", "kind": "azure_openai", "base_url": "https://res.openai.azure.com",
     "api_version": "2024-10-21", "api_key_env": "AZURE_KEY"},
    {"name": "groq", "kind": "openai_compatible", "base_url": "https://api.groq.com/openai/v1",
     "api_key_env": "GROQ_API_KEY", "headers": {"X-Title": "meshllm"}},
    {"name": "nokey", "kind": "openai_compatible", "base_url": "https://nokey.example/v1",
     "api_key_env": "NOKEY_API_KEY"},
    {"name": "anthropic", "kind": "anthropic", "api_key_env": "ANTHROPIC_API_KEY"},
    {"name": "gemini", "kind": "gemini", "api_key_env": "GEMINI_API_KEY"},
    {"name": "bedrock", "kind": "bedrock", "region": "eu-west-1"}
  ],
  "models": [
    {"name": "gpt", "provider": "openai", "model": "gpt-4.1", "aliases": ["mini"]},
    {"name": "text-embedding-3-small", "provider": "openai"},
    {"name": "azure-gpt-4o", "provider": "azure", "model": "gpt-4o", "deployment": "gpt4o-prod"},
    {"name": "fast", "provider": "groq", "model": "llama-3.1-8b-instant"},
    {"name": "broken", "provider": "nokey"},
    {"name": "claude", "provider": "anthropic", "model": "claude-sonnet-4-5"},
    {"name": "flash", "provider": "gemini", "model": "gemini-2.5-flash"},
    {"name": "nova", "provider": "bedrock", "model": "amazon.nova-pro-v1:0"}
  ],
  "routes": [{"name": "chain", "targets": ["broken", "claude", "flash", "nova", "fast"]}],
  "namespaces": {
    "shop": {"aliases": {"quick": "fast"}, "allowed_models": ["quick", "claude", "chain"],
             "quotas": {"limits": [{"name": "tiny", "requests_per_day": 3}]}},
    "down": {"quotas": {"limits": [{"name": "d", "requests_per_day": 10,
             "downgrade": {"at_percent": 1, "models": {"azure-gpt-4o": "fast"}}}]}}
  },
  "quotas": {"limits": [
    {"name": "team", "match": {"namespace": "team"}, "tokens_per_day": 100000, "requests_per_day": 50}
  ]},
  "max_request_bytes": 65536
}"#;

/// Shared quota rules in a store (exact and leased), failover off.
const CONFIG_SHARED: &str = r#"{
  "identity": {"source": "trusted_header", "header": "x-caller"},
  "providers": [
    {"name": "openai", "kind": "openai", "api_key_env": "OPENAI_API_KEY"},
    {"name": "anthropic", "kind": "anthropic", "api_key_env": "ANTHROPIC_API_KEY"},
    {"name": "bedrock", "kind": "bedrock", "region": "eu-west-1"}
  ],
  "models": [
    {"name": "gpt", "provider": "openai", "model": "gpt-4o-mini"},
    {"name": "claude", "provider": "anthropic", "model": "claude-sonnet-4-5"},
    {"name": "nova", "provider": "bedrock", "model": "amazon.nova-pro-v1:0"}
  ],
  "quotas": {
    "store": {"cluster": "quota_store", "timeout_ms": 250},
    "limits": [
      {"name": "team", "match": {"namespace": "team"}, "requests_per_day": 5,
       "tokens_per_day": 100000, "shared": true},
      {"name": "open", "match": {"namespace": "open"}, "requests_per_day": 5,
       "shared": true, "on_store_failure": "open"},
      {"name": "leased", "match": {"namespace": "shop"}, "requests_per_day": 100,
       "tokens_per_day": 100000, "shared": true,
       "lease": {"proxies": 2, "requests": 10, "tokens": 5000}},
      {"name": "local", "match": {"namespace": "team"}, "requests_per_day": 3}
    ]
  }
}"#;

/// No identity, a small body limit, one model per translating provider.
const CONFIG_SMALL: &str = r#"{
  "providers": [
    {"name": "openai", "kind": "openai", "api_key_env": "OPENAI_API_KEY"},
    {"name": "anthropic", "kind": "anthropic", "api_key_env": "ANTHROPIC_API_KEY"},
    {"name": "gemini", "kind": "gemini", "api_key_env": "GEMINI_API_KEY"},
    {"name": "bedrock", "kind": "bedrock", "region": "eu-west-1"}
  ],
  "models": [
    {"name": "gpt", "provider": "openai", "model": "gpt-4.1"},
    {"name": "claude", "provider": "anthropic", "model": "claude-sonnet-4-5"},
    {"name": "flash", "provider": "gemini", "model": "gemini-2.5-flash"},
    {"name": "nova", "provider": "bedrock", "model": "amazon.nova-pro-v1:0"}
  ],
  "routes": [{"name": "chain", "targets": ["nova", "claude", "gpt"]}],
  "max_request_bytes": 700
}"#;

const CONFIGS: &[&str] = &[CONFIG_ROUTED, CONFIG_SHARED, CONFIG_SMALL];

fn configs() -> Vec<Rc<Config>> {
    CONFIGS
        .iter()
        .map(|doc| Rc::new(testing::config(doc)))
        .collect()
}

/// Names a request may ask for: the configs' models, aliases and routes,
/// and names nobody configured.
const MODELS: &[&str] = &[
    "gpt",
    "mini",
    "text-embedding-3-small",
    "azure-gpt-4o",
    "fast",
    "quick",
    "broken",
    "claude",
    "flash",
    "nova",
    "chain",
    "gpt-4.1",
    "unknown-model",
    "",
    "gpt/../../x",
    "nova%3A0",
];

/// Names each configuration serves (by index in `CONFIGS`).
const SERVED: &[&[&str]] = &[
    &[
        "gpt",
        "mini",
        "azure-gpt-4o",
        "fast",
        "claude",
        "flash",
        "nova",
        "chain",
        "quick",
    ],
    &["gpt", "claude", "nova"],
    &["gpt", "claude", "flash", "nova", "chain"],
];

/// Callers the configurations know.
const KNOWN_CALLERS: &[&str] = &["team/api", "shop/web", "down/x", "open/y"];

const CALLERS: &[&str] = &[
    "team/api",
    "shop/web",
    "down/x",
    "open/y",
    "",
    "/",
    "team",
    "a/b/c",
    "shop/\u{fffd}",
];

// ---------------------------------------------------------------------------
// Inputs: requests

macro_rules! fixture {
    ($path:literal) => {
        include_bytes!(concat!("../../tests/fixtures/", $path)).as_slice()
    };
}

const CHAT: &str = r#"{"model": "gpt", "messages": [{"role": "system", "content": "terse"}, {"role": "user", "content": "hi \u00e9 \"model\""}], "temperature": 0.25, "max_tokens": 64, "stream": false, "metadata": {"model": "mini"}}"#;
const CHAT_STREAM: &str = r#"{"model": "gpt", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "stream": true, "stream_options": {"include_usage": true}, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}], "tool_choice": "auto"}"#;
const EMBED: &str = r#"{"input": ["smart", "mini"], "model": "text-embedding-3-small", "encoding_format": "float"}"#;
const MESSAGES: &str = r#"{"model": "claude", "max_tokens": 100, "system": "s", "messages": [{"role": "user", "content": "hi"}], "stream": false}"#;
const GEMINI: &str = r#"{"contents": [{"role": "user", "parts": [{"text": "hi"}]}], "generationConfig": {"maxOutputTokens": 10}}"#;
const RESPONSES: &str = r#"{"model": "gpt", "instructions": "i", "input": "hi", "max_output_tokens": 20, "stream": false}"#;
const RESPONSES_TOOLS: &str = r#"{"model": "gpt", "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}, {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}, {"type": "function_call_output", "call_id": "c", "output": "ok"}], "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}], "stream": true}"#;

/// An API a request may speak, with a valid body for it.
#[derive(Clone, Copy)]
enum Api {
    Chat,
    Embed,
    Messages,
    Gemini,
    Responses,
    Models,
    Other,
}

fn base_body(r: &mut Rng, api: Api, model: &str) -> Vec<u8> {
    let set_model = |text: &[u8]| -> Vec<u8> {
        let mut v: Value = serde_json::from_slice(text).unwrap_or(Value::Null);
        if let Some(o) = v.as_object_mut() {
            if o.contains_key("model") {
                o.insert("model".into(), Value::String(model.into()));
            }
        }
        v.to_string().into_bytes()
    };
    match api {
        Api::Chat => set_model(r.pick(&[CHAT, CHAT_STREAM]).as_bytes()),
        Api::Embed => set_model(EMBED.as_bytes()),
        Api::Messages => {
            let body = *r.pick(&[
                MESSAGES.as_bytes(),
                fixture!("anthropic/anthropic_caller_request_agent.json"),
            ]);
            let mut out = set_model(body);
            if r.chance(30) {
                out = String::from_utf8_lossy(&out)
                    .replacen("\"stream\":false", "\"stream\":true", 1)
                    .into_bytes();
            }
            out
        }
        Api::Gemini => r
            .pick(&[
                GEMINI.as_bytes(),
                fixture!("gemini/caller_request_tools.json"),
                fixture!("gemini/caller_request_images.json"),
                fixture!("gemini/caller_request_chat_history.json"),
            ])
            .to_vec(),
        Api::Responses => set_model(r.pick(&[RESPONSES, RESPONSES_TOOLS]).as_bytes()),
        Api::Models => Vec::new(),
        Api::Other => r.pick(&[CHAT, "", "null"]).as_bytes().to_vec(),
    }
}

fn path_for(r: &mut Rng, api: Api, model: &str) -> String {
    let gemini_model = if r.chance(10) { "" } else { model };
    match api {
        Api::Chat => "/v1/chat/completions".into(),
        Api::Embed => "/v1/embeddings".into(),
        Api::Messages => "/v1/messages".into(),
        Api::Responses => "/v1/responses".into(),
        Api::Gemini => {
            let prefix = r.pick(&["/v1beta/models/", "/v1/models/"]);
            let verb = r.pick(&[
                ":generateContent",
                ":streamGenerateContent?alt=sse",
                ":streamGenerateContent",
                ":countTokens",
                "",
                ":generateContent?key=leak&alt=sse",
            ]);
            format!("{prefix}{gemini_model}{verb}")
        }
        Api::Models => {
            if r.chance(50) {
                r.pick(&["/v1/models", "/v1beta/models", "/v1/models/?limit=5"])
                    .to_string()
            } else {
                format!("/v1/models/{model}")
            }
        }
        Api::Other => r
            .pick(&[
                "/",
                "",
                "*",
                "//",
                "/v1",
                "/v1/chat/completions/extra",
                "/V1/CHAT/COMPLETIONS",
                "/v1/chat/completions?x=%ZZ&y",
                "/v1beta/models/%E2%82:generateContent",
                "/v1/models//",
                "/v1/messages/count_tokens",
                "/v1/responses",
                "/v1beta/models/flash:generateContent/../../x",
                "http://evil/v1/chat/completions",
            ])
            .to_string(),
    }
}

/// Replaces a random node of `v` with a hostile value, or removes one.
fn mutate_value(r: &mut Rng, v: &mut Value) {
    let mut pointers = Vec::new();
    collect_pointers(v, String::new(), &mut pointers);
    let target = r.pick(&pointers).clone();
    if r.chance(15) && !target.is_empty() {
        // Remove the node from its parent.
        let (parent, key) = target.rsplit_once('/').unwrap_or(("", ""));
        let key = key.replace("~1", "/").replace("~0", "~");
        match v.pointer_mut(parent) {
            Some(Value::Object(o)) => {
                o.remove(&key);
            }
            Some(Value::Array(a)) => {
                if let Ok(i) = key.parse::<usize>() {
                    if i < a.len() {
                        a.remove(i);
                    }
                }
            }
            _ => {}
        }
        return;
    }
    let replacement = hostile_value(r, v.pointer(&target));
    if let Some(slot) = v.pointer_mut(&target) {
        *slot = replacement;
    }
}

fn collect_pointers(v: &Value, at: String, out: &mut Vec<String>) {
    out.push(at.clone());
    match v {
        Value::Object(o) => {
            for (k, child) in o {
                let k = k.replace('~', "~0").replace('/', "~1");
                collect_pointers(child, format!("{at}/{k}"), out);
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                collect_pointers(child, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

fn nested(depth: usize, leaf: Value, object: bool) -> Value {
    (0..depth).fold(leaf, |inner, _| {
        if object {
            json!({ "a": inner })
        } else {
            json!([inner])
        }
    })
}

/// A value of the wrong type, size or shape for most fields.
fn hostile_value(r: &mut Rng, old: Option<&Value>) -> Value {
    match r.below(22) {
        0 => Value::Null,
        1 => json!(true),
        2 => json!(0),
        3 => json!(-1),
        4 => json!(1e308),
        5 => json!(-1.5e300),
        6 => json!(u64::MAX),
        7 => json!(i64::MIN),
        8 => json!(0.5),
        9 => json!(""),
        10 => json!("x".repeat(r.below(20_000))),
        11 => json!(r.text(40)),
        12 => json!([]),
        13 => json!({}),
        14 => nested(r.below(100), json!(1), r.chance(50)),
        15 => json!([old.cloned().unwrap_or(Value::Null)]),
        16 => json!({ "type": r.text(8), "text": old.cloned().unwrap_or(Value::Null) }),
        17 => json!(*r.pick(MODELS)),
        18 => json!("12"),
        19 => json!([{"role": "user", "content": [{"type": "image", "source": {}}]}]),
        20 => {
            json!({"role": r.pick(&["user", "assistant", "tool", "system", "developer", "model", "x"]), "content": Value::Null})
        }
        _ => json!("\u{d7ff}\u{fffd}\u{0}"),
    }
}

/// Mutates raw bytes: flips, truncations, duplications, invalid UTF-8,
/// huge numbers, lone surrogates, deep nesting.
fn mutate_bytes(r: &mut Rng, body: &mut Vec<u8>) {
    let len = body.len();
    let at = r.below(len + 1);
    match r.below(12) {
        0 if len > 0 => body[at.min(len - 1)] ^= 1 << r.below(8),
        1 if len > 0 => body[at.min(len - 1)] = r.next() as u8,
        2 => body.truncate(at),
        3 => {
            let end = (at + r.below(64)).min(len);
            let copy = body[at..end].to_vec();
            let to = r.below(body.len() + 1);
            body.splice(to..to, copy);
        }
        4 => {
            let end = (at + r.below(32)).min(len);
            body.drain(at..end);
        }
        5 => {
            let bad: &[u8] = r.pick::<&[u8]>(&[
                b"\xff".as_slice(),
                b"\xc3",
                b"\xed\xa0\x80",
                b"\xf4\x90\x80\x80",
                b"\x00",
                b"\xef\xbb\xbf",
            ]);
            body.splice(at..at, bad.iter().copied());
        }
        6 => {
            let digits = "9".repeat(1 + r.below(400));
            body.splice(at..at, digits.into_bytes());
        }
        7 => {
            let esc: &[u8] = r.pick::<&[u8]>(&[
                br"\ud800".as_slice(),
                br"\udfff\ud800",
                br"\u00",
                br"\",
                br#"\""#,
            ]);
            body.splice(at..at, esc.iter().copied());
        }
        8 => {
            let depth = r.below(5_000);
            let (open, close) = if r.chance(50) {
                (b'[', b']')
            } else {
                (b'{', b'}')
            };
            let mut wrapped = vec![open; depth];
            wrapped.append(body);
            wrapped.extend(std::iter::repeat_n(
                close,
                if r.chance(80) { depth } else { 0 },
            ));
            *body = wrapped;
        }
        9 => {
            let junk = r.some_bytes(16);
            body.splice(at..at, junk);
        }
        10 => {
            // A duplicated key, which serde may take either way.
            let key: &[u8] = r.pick::<&[u8]>(&[
                br#""model":"chain","#.as_slice(),
                br#""stream":true,"#,
                br#""messages":[],"#,
                br#""max_tokens":-5,"#,
            ]);
            if let Some(i) = body.iter().position(|b| *b == b'{') {
                body.splice(i + 1..i + 1, key.iter().copied());
            }
        }
        _ => body.extend_from_within(..),
    }
}

/// A body from `base`: structural mutations, then byte mutations.
fn mutate_body(r: &mut Rng, base: &[u8]) -> Vec<u8> {
    let mut body = base.to_vec();
    if r.chance(50) {
        if let Ok(mut v) = serde_json::from_slice::<Value>(&body) {
            for _ in 0..1 + r.below(3) {
                mutate_value(r, &mut v);
            }
            body = v.to_string().into_bytes();
        }
    }
    if r.chance(50) {
        for _ in 0..1 + r.below(3) {
            mutate_bytes(r, &mut body);
        }
    }
    body
}

// ---------------------------------------------------------------------------
// Inputs: headers and properties

/// Headers only the gateway and Envoy may set, and credentials.
const FORGED: &[&str] = &[
    CLUSTER_HEADER,
    "x-meshllm-p0",
    "x-meshllm-p1",
    "x-meshllm-p2",
    "x-meshllm-p7",
    "x-meshllm-models",
    "x-meshllm-caller-api",
    "x-meshllm-provider",
    "x-meshllm-model",
    "x-meshllm-attempts",
    "x-meshllm-route",
    "x-meshllm-downgrade",
    "x-envoy-max-retries",
    "x-envoy-retry-on",
    "x-envoy-retriable-status-codes",
    "x-envoy-attempt-count",
    "x-envoy-upstream-rq-timeout-ms",
    "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-hedge-on-per-try-timeout",
    "x-envoy-original-path",
    "x-envoy-is-timeout-retry",
    "x-goog-api-key",
    "anthropic-version",
    "anthropic-beta",
    "api-key",
    "x-api-key",
    "x-amz-security-token",
    "x-amz-date",
    "openai-organization",
    "content-encoding",
    "transfer-encoding",
    ":authority",
    "x-caller",
    "accept",
];

fn header_value(r: &mut Rng) -> String {
    match r.below(8) {
        0 => String::new(),
        1 => r
            .pick(&[
                "0",
                "1",
                "8",
                "-1",
                "99999999999999999999",
                "meshllm",
                "meshllm.p1",
                "-",
                "flaky",
                "true",
            ])
            .to_string(),
        2 => r.text(30),
        // What a lossy adapter makes of a non-UTF-8 value.
        3 => String::from_utf8_lossy(&r.bytes(12)).into_owned(),
        4 => "v".repeat(r.below(70_000)),
        5 => r.pick(MODELS).to_string(),
        6 => r.pick(CALLERS).to_string(),
        _ => r
            .pick(&[
                "gzip, br",
                "text/event-stream",
                "application/json",
                "Bearer x",
                "2023-06-01",
            ])
            .to_string(),
    }
}

fn request_headers(r: &mut Rng, method: &str, path: &str, body: &[u8]) -> Vec<(String, String)> {
    let mut h: Vec<(String, String)> = Vec::new();
    let mut push = |n: &str, v: &str| h.push((n.to_string(), v.to_string()));
    if !r.chance(3) {
        push(":method", method);
    }
    if !r.chance(3) {
        push(":path", path);
    }
    if !r.chance(3) {
        push(":authority", "gateway.local");
    }
    push(":scheme", "http");
    if r.chance(85) {
        push(
            "content-type",
            r.pick::<&str>(&[
                "application/json",
                "application/json; charset=utf-8",
                "text/plain",
                "",
            ]),
        );
    }
    if r.chance(70) {
        let len = if r.chance(85) {
            body.len().to_string()
        } else {
            header_value(r)
        };
        push("content-length", &len);
    }
    if r.chance(20) {
        push("x-caller", r.pick::<&str>(CALLERS));
    }
    if r.chance(50) {
        push("authorization", "Bearer client-secret");
    }
    if r.chance(20) {
        push("accept-encoding", "gzip, br");
    }
    let forged = if r.chance(50) { r.below(6) } else { 0 };
    for _ in 0..forged {
        let name = *r.pick(FORGED);
        let value = header_value(r);
        push(name, &value);
    }
    if r.chance(1) {
        // A flood of headers, many of them the same.
        for i in 0..500 {
            let name = format!("x-flood-{}", i % 7);
            push(&name, "v");
        }
    }
    if r.chance(10) {
        let name = r.text(12).to_ascii_lowercase();
        let value = header_value(r);
        push(&name, &value);
    }
    h
}

/// Properties another filter, the other half or Envoy may have set.
fn properties(r: &mut Rng) -> Vec<(String, Bytes)> {
    let mut p = Vec::new();
    for name in [USAGE_PROPERTY, ANSWER_STATUS_PROPERTY, PLAN_PROPERTY] {
        if r.chance(5) {
            let value = match r.below(3) {
                0 => r.some_bytes(40),
                1 => b"{\"prompt_tokens\":-1}".to_vec(),
                _ => b"200".to_vec(),
            };
            p.push((name.to_string(), Bytes(value)));
        }
    }
    if r.chance(5) {
        p.push((
            "xds.node.metadata.NAMESPACE".into(),
            Bytes(r.pick(&["shop", "team", ""]).as_bytes().to_vec()),
        ));
    }
    p
}

// ---------------------------------------------------------------------------
// Inputs: provider answers and callouts

/// Mutates the JSON of an answer, or of each of its SSE events: numbers
/// (token counts, indexes) pushed to extremes, or random nodes replaced.
fn mutate_events(r: &mut Rng, answer: &[u8]) -> Vec<u8> {
    let extremes = r.chance(50);
    let mutate = |r: &mut Rng, text: &[u8]| -> Option<Vec<u8>> {
        let mut v: Value = serde_json::from_slice(text).ok()?;
        if extremes {
            extreme_numbers(r, &mut v);
        } else {
            mutate_value(r, &mut v);
        }
        Some(v.to_string().into_bytes())
    };
    if let Some(whole) = mutate(r, answer) {
        return whole;
    }
    let mut out = Vec::with_capacity(answer.len());
    for line in answer.split_inclusive(|b| *b == b'\n') {
        let mutated = match line.strip_prefix(b"data: ") {
            Some(data) if r.chance(40) => {
                let data = data.strip_suffix(b"\n").unwrap_or(data);
                mutate(r, data).map(|json| [b"data: ".as_slice(), &json, b"\n"].concat())
            }
            _ => None,
        };
        out.extend(mutated.as_deref().unwrap_or(line));
    }
    out
}

fn extreme_numbers(r: &mut Rng, v: &mut Value) {
    match v {
        Value::Number(_) if r.chance(50) => {
            *v = r
                .pick(&[
                    json!(u64::MAX),
                    json!(i64::MIN),
                    json!(-1),
                    json!(1e308),
                    json!(-0.5),
                    json!(u32::MAX),
                ])
                .clone();
        }
        Value::Array(items) => items.iter_mut().for_each(|item| extreme_numbers(r, item)),
        Value::Object(fields) => fields
            .values_mut()
            .for_each(|field| extreme_numbers(r, field)),
        _ => {}
    }
}

/// One answer body, most often in the wire format of the provider that
/// serves `model` (see `CONFIG_ROUTED`), with its content type.
fn answer_corpus(r: &mut Rng, model: &str) -> (&'static str, Vec<u8>) {
    let kind: &[usize] = match model {
        "claude" => &[6, 7, 8, 22],
        "flash" => &[9, 10, 11, 12, 13, 23],
        "nova" => &[14, 15, 16, 17, 18, 19, 20],
        "chain" | "" => &[],
        _ => &[0, 1, 2, 3, 4, 5, 21, 24],
    };
    let index = if !kind.is_empty() && r.chance(70) {
        *r.pick(kind)
    } else {
        r.below(26)
    };
    answer_by_index(r, index)
}

fn answer_by_index(r: &mut Rng, index: usize) -> (&'static str, Vec<u8>) {
    const JSON: &str = "application/json";
    const SSE: &str = "text/event-stream";
    const AWS: &str = "application/vnd.amazon.eventstream";
    let openai_json: &[u8] = br#"{"id":"chatcmpl-1","object":"chat.completion","created":1700000000,"model":"gpt-4.1","choices":[{"index":0,"message":{"role":"assistant","content":"hi","tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{}"}}]},"finish_reason":"stop"}],"usage":{"prompt_tokens":25,"completion_tokens":9,"total_tokens":34,"prompt_tokens_details":{"cached_tokens":3}}}"#;
    let embed_json: &[u8] = br#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1,-0.2]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":2,"total_tokens":2}}"#;
    let openai_sse: &[u8] = b"data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4.1\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"he\"},\"finish_reason\":null}]}\n\ndata: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4.1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"llo\"},\"finish_reason\":\"stop\"}]}\n\ndata: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4.1\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\n\ndata: [DONE]\n\n";
    match index {
        0 => (JSON, openai_json.to_vec()),
        1 => (JSON, embed_json.to_vec()),
        2 => (SSE, openai_sse.to_vec()),
        3 => (
            SSE,
            fixture!("openai/anthropic_caller_text_stream.sse").to_vec(),
        ),
        4 => (
            SSE,
            fixture!("openai/gemini_caller_tool_stream.sse").to_vec(),
        ),
        5 => (
            JSON,
            fixture!("openai/anthropic_caller_response_tool.json").to_vec(),
        ),
        6 => (JSON, fixture!("anthropic/response_tool_use.json").to_vec()),
        7 => (SSE, fixture!("anthropic/text_stream.sse").to_vec()),
        8 => (SSE, fixture!("anthropic/tool_stream.sse").to_vec()),
        9 => (
            JSON,
            fixture!("gemini/provider_response_tool_use.json").to_vec(),
        ),
        10 => (
            JSON,
            fixture!("gemini/provider_response_blocked.json").to_vec(),
        ),
        11 => (JSON, fixture!("gemini/provider_error_quota.json").to_vec()),
        12 => (SSE, fixture!("gemini/provider_text_stream.sse").to_vec()),
        13 => (SSE, fixture!("gemini/provider_tool_stream.sse").to_vec()),
        14 => (JSON, fixture!("bedrock/response_text.json").to_vec()),
        15 => (JSON, fixture!("bedrock/response_tool_use.json").to_vec()),
        16 => (AWS, fixture!("bedrock/tool_stream.bin").to_vec()),
        17 => (
            AWS,
            fixture!("hostile/streams/bedrock_corrupt.bin").to_vec(),
        ),
        18 => (
            AWS,
            fixture!("hostile/streams/bedrock_bad_frame.bin").to_vec(),
        ),
        19 => (
            AWS,
            fixture!("hostile/streams/bedrock_lone_surrogate.bin").to_vec(),
        ),
        20 => (AWS, aws_frames(r)),
        21 => (SSE, fixture!("hostile/streams/openai_corrupt.sse").to_vec()),
        22 => (
            SSE,
            fixture!("hostile/streams/anthropic_corrupt.sse").to_vec(),
        ),
        23 => (
            SSE,
            fixture!("hostile/streams/gemini_lone_surrogate.sse").to_vec(),
        ),
        24 => (SSE, fixture!("hostile/streams/openai_giant.sse").to_vec()),
        _ => {
            let errors: &[&[u8]] = &[
                fixture!("hostile/errors/400-detail-string.json"),
                fixture!("hostile/errors/413-nginx-too-large.html"),
                fixture!("hostile/errors/422-fastapi-validation.json"),
                fixture!("hostile/errors/429-gemini-shaped.json"),
                fixture!("hostile/errors/500-binary.bin"),
                fixture!("hostile/errors/500-json-null.json"),
                fixture!("hostile/errors/500-truncated-json.json"),
                fixture!("hostile/errors/502-empty.txt"),
                fixture!("hostile/errors/503-gemini-array.json"),
                fixture!("hostile/errors/503-json-string.json"),
                fixture!("hostile/errors/503-plain-overloaded.txt"),
            ];
            (JSON, r.pick(errors).to_vec())
        }
    }
}

/// AWS event-stream frames with random event types and JSON payloads.
fn aws_frames(r: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..1 + r.below(5) {
        let event = *r.pick(&[
            "messageStart",
            "contentBlockStart",
            "contentBlockDelta",
            "contentBlockStop",
            "messageStop",
            "metadata",
            "throttlingException",
            "x",
        ]);
        let kind = *r.pick(&["event", "exception", "error", ""]);
        let payload = match r.below(5) {
            0 => br#"{"role":"assistant"}"#.to_vec(),
            1 => br#"{"contentBlockIndex":0,"delta":{"text":"hi"}}"#.to_vec(),
            2 => br#"{"usage":{"inputTokens":-4,"outputTokens":18446744073709551615}}"#.to_vec(),
            3 => br#"{"stopReason":"end_turn"}"#.to_vec(),
            _ => r.some_bytes(30),
        };
        out.extend(encode(
            &[
                (":event-type", event),
                (":message-type", kind),
                (":content-type", "application/json"),
            ],
            &payload,
        ));
    }
    out
}

/// How a store or guardrail call ended.
/// A `CalloutAnswer` whose bytes print as text in a reproduction.
#[derive(Debug, Clone)]
enum Answer {
    Http { status: u16, body: Bytes },
    Grpc { status: u32, message: Bytes },
    Failed(String),
}

impl Answer {
    fn to_callout(&self) -> CalloutAnswer {
        match self {
            Answer::Http { status, body } => CalloutAnswer::Http {
                status: *status,
                headers: Vec::new(),
                body: body.0.clone(),
            },
            Answer::Grpc { status, message } => CalloutAnswer::Grpc {
                status: *status,
                message: message.0.clone(),
            },
            Answer::Failed(why) => CalloutAnswer::Failed(why.clone()),
        }
    }
}

fn callout_answer(r: &mut Rng) -> Answer {
    match r.below(6) {
        0 => Answer::Failed("timeout".into()),
        1 => Answer::Grpc {
            status: r.below(20) as u32,
            message: Bytes(r.some_bytes(20)),
        },
        _ => {
            let bodies: &[&str] = &[
                r#"{"EVALSHA":[1,4,30]}"#,
                r#"{"EVALSHA":[0,5,86400]}"#,
                r#"{"EVALSHA":[1,12]}"#,
                r#"{"EVALSHA":[1,10,5000,3600]}"#,
                r#"{"EVALSHA":[0,0,0,0]}"#,
                r#"{"EVALSHA":[-1,-4,-30]}"#,
                r#"{"EVALSHA":[18446744073709551615,1e308]}"#,
                r#"{"EVALSHA":[false,"NOSCRIPT No matching script"]}"#,
                r#"{"EVAL":[1,4,30]}"#,
                r#"{"EVALSHA":"NOSCRIPT"}"#,
                r#"{"EVALSHA":[]}"#,
                r#"{"EVALSHA":[[1,2],[3]]}"#,
                "[]",
                "",
            ];
            let mut body = r.pick(bodies).as_bytes().to_vec();
            if r.chance(40) {
                body = mutate_body(r, &body);
            }
            let status = *r.pick(&[200, 200, 200, 0, 204, 299, 404, 500, 503, 999]);
            Answer::Http {
                status,
                body: Bytes(body),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// A case

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// The listener half without failover.
    Standalone,
    /// The listener half that may hand Envoy a chain.
    Chains,
    /// The upstream half, after a listener half planned the request.
    Upstream,
}

#[derive(Debug, Clone)]
enum Faults {
    None,
    RefuseSets,
    AlwaysConflicting,
    /// A rival worker writes these bytes over our keys, `turns` times.
    Rival(Bytes, u32),
}

/// Which call `on_callout` is told of.
#[derive(Debug, Clone)]
enum CallRef {
    /// The latest call the request dispatched (0 when none).
    Latest,
    Raw(u32),
}

#[derive(Debug, Clone)]
enum Step {
    RequestHeaders {
        end_of_stream: bool,
    },
    /// Delivers the next `take` body bytes; `extra` inflates the size told.
    RequestBody {
        take: usize,
        extra: usize,
        end_of_stream: bool,
    },
    RequestTrailers,
    ResponseHeaders {
        status: String,
        headers: Vec<(String, String)>,
        details: Option<String>,
        end_of_stream: bool,
    },
    /// Appends `chunk`; `extra` inflates the size told.
    ResponseBody {
        chunk: Bytes,
        extra: usize,
        end_of_stream: bool,
    },
    Callout {
        call: CallRef,
        answer: Answer,
    },
    /// Answers every outstanding detached call.
    Detached {
        answer: Answer,
    },
    Done,
    Fail(Vec<Op>),
    Heal,
    Clock(u64),
}

#[derive(Debug, Clone)]
struct Case {
    seed: u64,
    config: usize,
    side: Side,
    /// The upstream half's request as the listener half saw it, before any
    /// mutation; the listener half's headers and properties are handed on.
    plan_request: Option<(Vec<(String, String)>, Bytes)>,
    /// Position property of the upstream half (None: absent).
    position: Option<String>,
    /// The seed of byte mutations of the plan the listener half handed on.
    plan_mutation: Option<u64>,
    request_headers: Vec<(String, String)>,
    properties: Vec<(String, Bytes)>,
    body: Bytes,
    failing: Vec<Op>,
    shared: Faults,
    steps: Vec<Step>,
}

const ALL_OPS: &[Op] = &[
    Op::SetRequestHeader,
    Op::RemoveRequestHeader,
    Op::RequestHeaderNames,
    Op::RequestBody,
    Op::ReplaceRequestBody,
    Op::SetResponseHeader,
    Op::RemoveResponseHeader,
    Op::ResponseHeaderNames,
    Op::ResponseBody,
    Op::ReplaceResponseBody,
    Op::SendResponse,
    Op::CallOut,
    Op::ResumeRequest,
    Op::ResumeResponse,
];

fn random_ops(r: &mut Rng) -> Vec<Op> {
    (0..1 + r.below(3)).map(|_| *r.pick(ALL_OPS)).collect()
}

/// Splits `len` bytes into 1..=6 random pieces.
fn cuts(r: &mut Rng, len: usize) -> Vec<usize> {
    let mut points: BTreeSet<usize> = BTreeSet::new();
    if len > 0 {
        for _ in 0..r.below(6) {
            points.insert(r.below(len));
        }
    }
    points.remove(&0);
    let mut pieces = Vec::new();
    let mut last = 0;
    for p in points {
        pieces.push(p - last);
        last = p;
    }
    pieces.push(len - last);
    pieces
}

fn gen_case(seed: u64) -> Case {
    let mut r = Rng(seed);
    let side = *r.pick(&[Side::Standalone, Side::Chains, Side::Upstream]);
    // The upstream half serves chains: the configurations with a route.
    let config = match side {
        Side::Upstream => *r.pick(&[0, 2]),
        _ => r.below(CONFIGS.len()),
    };
    let planned_api = *r.pick(&[
        Api::Chat,
        Api::Chat,
        Api::Messages,
        Api::Gemini,
        Api::Responses,
    ]);
    let api = *r.pick(&[
        Api::Chat,
        Api::Chat,
        Api::Chat,
        Api::Embed,
        Api::Messages,
        Api::Messages,
        Api::Gemini,
        Api::Gemini,
        Api::Responses,
        Api::Models,
        Api::Other,
    ]);
    let api = if side == Side::Upstream && r.chance(80) {
        planned_api
    } else {
        api
    };
    let model = if r.chance(75) {
        *r.pick(SERVED[config])
    } else {
        *r.pick(MODELS)
    };
    let path = path_for(&mut r, api, model);
    let method = match api {
        Api::Models => "GET",
        _ => "POST",
    };
    let method = if r.chance(8) {
        *r.pick(&["GET", "PUT", "HEAD", "post", "", "DELETE", "OPTIONS"])
    } else {
        method
    };
    let base = base_body(&mut r, api, model);
    let body = if r.chance(50) {
        mutate_body(&mut r, &base)
    } else {
        base.clone()
    };
    let mut request_headers = request_headers(&mut r, method, &path, &body);
    if r.chance(80) {
        request_headers.push(("x-caller".into(), r.pick(KNOWN_CALLERS).to_string()));
    }

    let (plan_request, position) = if side == Side::Upstream {
        // The listener half saw the valid request, for the route most often.
        let model = if r.chance(85) {
            "chain"
        } else {
            *r.pick(SERVED[config])
        };
        let api = planned_api;
        let planned = base_body(&mut r, api, model);
        let mut headers = vec![
            (":method".to_string(), "POST".to_string()),
            (":path".to_string(), path_for(&mut r, api, model)),
            (":authority".to_string(), "gateway.local".to_string()),
            ("content-type".to_string(), "application/json".to_string()),
        ];
        headers.push(("x-caller".into(), r.pick(KNOWN_CALLERS).to_string()));
        let position = match r.below(10) {
            0 => None,
            1 => Some(
                r.pick(&["", "-1", "7", "8", "99999999999999999999", "x", "1.0", " 1"])
                    .to_string(),
            ),
            n => Some(((n - 2) % 4).to_string()),
        };
        (Some((headers, Bytes(planned))), position)
    } else {
        (None, None)
    };
    let plan_mutation = (side == Side::Upstream && r.chance(15)).then(|| r.next());

    let properties = properties(&mut r);
    let failing = if r.chance(20) {
        random_ops(&mut r)
    } else {
        Vec::new()
    };
    let shared = match r.below(10) {
        0 => Faults::RefuseSets,
        1 => Faults::AlwaysConflicting,
        2 => {
            let value = match r.below(3) {
                0 => r.some_bytes(40),
                1 => b"{}".to_vec(),
                _ => Vec::new(),
            };
            Faults::Rival(Bytes(value), 1 + r.below(4) as u32)
        }
        _ => Faults::None,
    };

    // The ordinary order of callbacks, then perturbations.
    let mut steps = Vec::new();
    let bodiless = body.is_empty() && r.chance(70);
    steps.push(Step::RequestHeaders {
        end_of_stream: bodiless,
    });
    if !bodiless {
        let trailers = r.chance(10);
        let pieces = cuts(&mut r, body.len());
        let n = pieces.len();
        for (i, take) in pieces.into_iter().enumerate() {
            let extra = inflated(&mut r);
            steps.push(Step::RequestBody {
                take,
                extra,
                end_of_stream: i + 1 == n && !trailers,
            });
        }
        if trailers {
            steps.push(Step::RequestTrailers);
        }
    }
    if config == 1 || r.chance(10) {
        for _ in 0..1 + r.below(2) {
            steps.push(Step::Callout {
                call: CallRef::Latest,
                answer: callout_answer(&mut r),
            });
        }
    }
    if r.chance(90) {
        let (content_type, answer) = answer_corpus(&mut r, model);
        let answer = match r.below(10) {
            0..=2 => mutate_events(&mut r, &answer),
            3..=6 => mutate_body(&mut r, &answer),
            _ => answer,
        };
        let status = if r.chance(60) {
            "200".to_string()
        } else if r.chance(90) {
            r.pick(&[
                "400", "401", "404", "413", "429", "500", "502", "503", "504", "204", "301",
            ])
            .to_string()
        } else {
            r.pick(&["", "0", "abc", "99999", "-1", "600", "2000"])
                .to_string()
        };
        let mut headers = vec![("content-type".to_string(), content_type.to_string())];
        if r.chance(30) {
            headers[0].1 = header_value(&mut r);
        }
        if r.chance(30) {
            headers.push(("content-length".into(), answer.len().to_string()));
        }
        if r.chance(15) {
            headers.push(("content-encoding".into(), "gzip".into()));
        }
        if r.chance(20) {
            let name = *r.pick(&[
                "x-ratelimit-remaining-requests",
                "retry-after",
                "x-meshllm-provider",
                "x-meshllm-attempts",
                "x-envoy-upstream-service-time",
            ]);
            headers.push((name.into(), header_value(&mut r)));
        }
        let details = match r.below(6) {
            0 => None,
            1 => Some(
                r.pick(&[
                    "upstream_reset_before_response_started{connection_failure}",
                    "response_timeout",
                    "request_payload_too_large",
                    "",
                ])
                .to_string(),
            ),
            _ => Some("via_upstream".to_string()),
        };
        let headers_only = answer.is_empty() && r.chance(50);
        steps.push(Step::ResponseHeaders {
            status,
            headers,
            details,
            end_of_stream: headers_only,
        });
        if !headers_only {
            let pieces = cuts(&mut r, answer.len());
            let n = pieces.len();
            let ends_early = r.chance(5);
            let mut at = 0;
            for (i, take) in pieces.into_iter().enumerate() {
                steps.push(Step::ResponseBody {
                    chunk: Bytes(answer[at..at + take].to_vec()),
                    extra: inflated(&mut r),
                    end_of_stream: i + 1 == n && !ends_early,
                });
                at += take;
            }
        }
    }
    if r.chance(60) {
        steps.push(Step::Done);
    }
    if r.chance(50) {
        steps.push(Step::Detached {
            answer: callout_answer(&mut r),
        });
    }

    if r.chance(50) {
        for _ in 0..1 + r.below(4) {
            perturb(&mut r, &mut steps);
        }
    }

    Case {
        seed,
        config,
        side,
        plan_request,
        position,
        plan_mutation,
        request_headers,
        properties,
        body: Bytes(body),
        failing,
        shared,
        steps,
    }
}

/// Now and then, more bytes than the buffer holds (sizes come from the
/// proxy, not from the buffer the filter reads).
fn inflated(r: &mut Rng) -> usize {
    if r.chance(3) {
        *r.pick(&[1, 4096, 1 << 20, u32::MAX as usize])
    } else {
        0
    }
}

/// Callbacks out of order, twice, dropped; calls answered at odd times;
/// host calls failing or healing half-way.
fn perturb(r: &mut Rng, steps: &mut Vec<Step>) {
    let len = steps.len();
    let at = r.below(len + 1);
    match r.below(9) {
        0 if len > 1 => {
            let other = r.below(len);
            steps.swap(at.min(len - 1), other);
        }
        1 if len > 0 => {
            let copy = steps[at.min(len - 1)].clone();
            steps.insert(at, copy);
        }
        2 if len > 0 => {
            steps.remove(at.min(len - 1));
        }
        3 => steps.insert(at, Step::Done),
        4 => steps.insert(
            at,
            Step::Callout {
                call: if r.chance(50) {
                    CallRef::Latest
                } else {
                    CallRef::Raw(*r.pick(&[0, 1, 2, 7, u32::MAX]))
                },
                answer: callout_answer(r),
            },
        ),
        5 => steps.insert(at, Step::Fail(random_ops(r))),
        6 => steps.insert(at, Step::Heal),
        7 => steps.insert(
            at,
            Step::Clock(*r.pick(&[1, 1_000, 60_000, 86_400_000, 400 * 86_400_000])),
        ),
        _ => steps.insert(
            at,
            r.pick(&[
                Step::RequestTrailers,
                Step::RequestBody {
                    take: 0,
                    extra: 0,
                    end_of_stream: true,
                },
                Step::ResponseBody {
                    chunk: Bytes(Vec::new()),
                    extra: 0,
                    end_of_stream: true,
                },
                Step::RequestHeaders {
                    end_of_stream: false,
                },
            ])
            .clone(),
        ),
    }
}

// ---------------------------------------------------------------------------
// Running a case

const START_MS: u64 = 1_772_323_230_000;

const POSITION_PROPERTY: &str = "xds.upstream_host_metadata.filter_metadata.meshllm.position";

fn fresh_host(case: &Case, headers: Vec<(String, String)>) -> MockHost {
    let mut host = MockHost {
        request_headers: headers,
        now_ms: START_MS,
        ..MockHost::default()
    };
    for (name, value) in &case.properties {
        host.properties.insert(name.clone(), value.0.clone());
    }
    match &case.shared {
        Faults::None => {}
        Faults::RefuseSets => host.shared.refuse_sets = true,
        Faults::AlwaysConflicting => host.shared.rival = Some(Rival::always_conflicting()),
        Faults::Rival(value, turns) => {
            host.shared.rival = Some(Rival::writing(value.0.clone(), *turns));
        }
    }
    host
}

/// What one case reached, to show the run exercised more than refusals.
#[derive(Debug, Default)]
struct Reached {
    replies: u64,
    /// Requests pointed at a provider or a chain (the cluster header set).
    routed: u64,
    callouts: u64,
    response_bodies_rewritten: u64,
    /// Local replies by status.
    statuses: std::collections::BTreeMap<u16, u64>,
}

impl Reached {
    fn add(&mut self, other: &Reached) {
        self.replies += other.replies;
        self.routed += other.routed;
        self.callouts += other.callouts;
        self.response_bodies_rewritten += other.response_bodies_rewritten;
        for (status, n) in &other.statuses {
            *self.statuses.entry(*status).or_default() += n;
        }
    }
}

/// Runs one case; what it reached, or the invariant it broke. Panics
/// propagate.
fn run_case(configs: &[Rc<Config>], case: &Case) -> Result<Reached, String> {
    let cfg = Rc::clone(&configs[case.config]);
    let mut host = fresh_host(case, case.request_headers.clone());
    let mut f = match case.side {
        Side::Standalone => Filter::Listener(Router::new(Rc::clone(&cfg), false)),
        Side::Chains => Filter::Listener(Router::new(Rc::clone(&cfg), true)),
        Side::Upstream => {
            // The listener half plans; Envoy's upstream filter then sees
            // what it left, with this case's headers on top.
            let (headers, body) = case.plan_request.clone().unwrap_or_default();
            let mut planner = fresh_host(case, headers);
            planner.request_body = body.0.clone();
            let mut listener = Filter::Listener(Router::new(Rc::clone(&cfg), true));
            if listener.on_request_headers(&mut planner, false) == Flow::Pause
                && planner.sent.is_empty()
            {
                listener.on_request_body(&mut planner, body.0.len(), true);
            }
            check_replies(&planner.sent)?;
            for (name, value) in &case.request_headers {
                if !name.starts_with(':') {
                    host.request_headers.push((name.clone(), value.clone()));
                }
            }
            let mut planned = planner.request_headers;
            planned.append(&mut host.request_headers);
            host.request_headers = planned;
            host.properties.extend(planner.properties);
            if let (Some(seed), Some(plan)) =
                (case.plan_mutation, host.properties.get_mut(PLAN_PROPERTY))
            {
                let mut r = Rng(seed);
                for _ in 0..1 + r.below(3) {
                    mutate_bytes(&mut r, plan);
                }
            }
            if let Some(position) = &case.position {
                host.properties
                    .insert(POSITION_PROPERTY.into(), position.as_bytes().to_vec());
            }
            host.shared = std::mem::take(&mut planner.shared);
            Filter::upstream(Rc::clone(&cfg))
        }
    };
    host.fail(&case.failing);

    let body = &case.body.0;
    let mut cursor = 0;
    for step in &case.steps {
        match step {
            Step::RequestHeaders { end_of_stream } => {
                f.on_request_headers(&mut host, *end_of_stream);
            }
            Step::RequestBody {
                take,
                extra,
                end_of_stream,
            } => {
                let end = (cursor + take).min(body.len());
                host.request_body.extend_from_slice(&body[cursor..end]);
                cursor = end;
                let size = host.request_body.len() + extra;
                if f.on_request_body(&mut host, size, *end_of_stream) == Flow::Continue {
                    host.request_body.clear();
                }
            }
            Step::RequestTrailers => {
                let size = host.request_body.len();
                f.on_request_trailers(&mut host, size);
            }
            Step::ResponseHeaders {
                status,
                headers,
                details,
                end_of_stream,
            } => {
                host.response_headers = vec![(":status".into(), status.clone())];
                host.response_headers.extend(headers.iter().cloned());
                host.response_body.clear();
                host.code_details = details.clone();
                f.on_response_headers(&mut host, *end_of_stream);
            }
            Step::ResponseBody {
                chunk,
                extra,
                end_of_stream,
            } => {
                host.response_body.extend_from_slice(&chunk.0);
                let size = host.response_body.len() + extra;
                if f.on_response_body(&mut host, size, *end_of_stream) == Flow::Continue {
                    host.response_body.clear();
                }
            }
            Step::Callout { call, answer } => {
                let id = match call {
                    CallRef::Latest => host
                        .callouts
                        .iter()
                        .rev()
                        .find(|c| !c.detached)
                        .map_or(0, |c| c.id),
                    CallRef::Raw(id) => *id,
                };
                f.on_callout(&mut host, id, answer.to_callout());
            }
            Step::Detached { answer } => {
                let mut ids: Vec<u32> = host.detached.0.keys().copied().collect();
                ids.sort_unstable();
                for id in ids {
                    host.answer_detached(id, answer.to_callout());
                }
            }
            Step::Done => f.on_done(&mut host),
            Step::Fail(ops) => host.fail(ops),
            Step::Heal => host.failing.clear(),
            Step::Clock(ms) => host.now_ms += ms,
        }
    }
    check_replies(&host.sent)?;
    Ok(Reached {
        replies: host.sent.len() as u64,
        routed: u64::from(host.req(CLUSTER_HEADER).is_some()),
        callouts: host.callouts.len() as u64,
        response_bodies_rewritten: host.response_body_replacements as u64,
        statuses: host.sent.iter().fold(Default::default(), |mut m, s| {
            *m.entry(s.status).or_default() += 1;
            m
        }),
    })
}

/// Every local reply: a status a client understands, a JSON body (an SSE
/// one when it says so) and none of the providers' keys.
fn check_replies(sent: &[Sent]) -> Result<(), String> {
    for reply in sent {
        check_reply(reply)?;
    }
    Ok(())
}

fn check_reply(reply: &Sent) -> Result<(), String> {
    if !(reply.status == 200 || (400..=599).contains(&reply.status)) {
        return Err(format!("local reply with status {}", reply.status));
    }
    let sse = reply
        .header("content-type")
        .is_some_and(|t| t.starts_with("text/event-stream"));
    if sse {
        let text = std::str::from_utf8(&reply.body)
            .map_err(|_| "an SSE local reply that is not UTF-8".to_string())?;
        if !(text.starts_with("event:") || text.starts_with("data:") || text.starts_with(':')) {
            return Err(format!("an SSE local reply that is not SSE: {text:?}"));
        }
    } else if let Err(e) = serde_json::from_slice::<Value>(&reply.body) {
        return Err(format!(
            "a local reply that is not JSON ({e}): {:?}",
            reply.text()
        ));
    }
    for (var, key) in TEST_ENV {
        if key.trim().is_empty() {
            continue;
        }
        let in_headers = reply
            .headers
            .iter()
            .any(|(n, v)| n.contains(key) || v.contains(key));
        if in_headers || reply.body.windows(key.len()).any(|w| w == key.as_bytes()) {
            return Err(format!("a local reply shows {var}: {reply:?}"));
        }
    }
    Ok(())
}

fn fuzz(base: u64, cases: u64) -> Reached {
    let configs = configs();
    let mut total = Reached::default();
    for i in 0..cases {
        let case = gen_case(case_seed(base, i));
        let replay = format!(
            "fuzz case {i} (replay with MESHLLM_FUZZ_SEED={} MESHLLM_FUZZ_CASES=1 \
             cargo test --lib fuzz -- --ignored)",
            base.wrapping_add(i)
        );
        total.add(&run_checked(&configs, &case, &replay));
    }
    total
}

/// Runs `case` under `catch_unwind`; a panic or a broken invariant fails
/// the test with the case's inputs.
fn run_checked(configs: &[Rc<Config>], case: &Case, what: &str) -> Reached {
    let failure = match catch_unwind(AssertUnwindSafe(|| run_case(configs, case))) {
        Ok(Ok(reached)) => return reached,
        Ok(Err(broken)) => format!("broke an invariant: {broken}"),
        Err(payload) => {
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "(no message)".into());
            format!("panicked: {message}")
        }
    };
    panic!(
        "{what}, seed {:#018x}, {failure}\nreproduction: {case:#?}",
        case.seed
    );
}

/// Values of the wrong type or size, put in every field in turn.
fn sweep_values() -> Vec<Value> {
    vec![
        Value::Null,
        json!(true),
        json!(-1),
        json!(u64::MAX),
        json!(1e308),
        json!(0.5),
        json!(""),
        json!("x".repeat(5000)),
        json!([]),
        json!({}),
        json!([[[[{"a": [1]}]]]]),
        json!({"type": "image", "source": {"type": "base64"}}),
    ]
}

/// Every field of every request fixture, with every value of
/// `sweep_values` (a `stride`th of the pairs, each field with other
/// values), through the listener half and a
/// provider's answer.
fn sweep(stride: usize) -> u64 {
    let configs = configs();
    let requests: &[(&str, &str, &[u8])] = &[
        ("/v1/chat/completions", "gpt", CHAT.as_bytes()),
        ("/v1/chat/completions", "claude", CHAT_STREAM.as_bytes()),
        ("/v1/chat/completions", "nova", CHAT.as_bytes()),
        ("/v1/chat/completions", "flash", CHAT_STREAM.as_bytes()),
        ("/v1/embeddings", "text-embedding-3-small", EMBED.as_bytes()),
        ("/v1/messages", "gpt", MESSAGES.as_bytes()),
        (
            "/v1/messages",
            "nova",
            fixture!("anthropic/anthropic_caller_request_agent.json"),
        ),
        (
            "/v1beta/models/claude:generateContent",
            "claude",
            GEMINI.as_bytes(),
        ),
        (
            "/v1beta/models/gpt:streamGenerateContent?alt=sse",
            "gpt",
            fixture!("gemini/caller_request_tools.json"),
        ),
    ];
    let mut runs = 0;
    for (n, (path, model, base)) in requests.iter().enumerate() {
        let mut r = Rng(n as u64);
        let mut v: Value = serde_json::from_slice(base).unwrap_or(Value::Null);
        if let Some(o) = v.as_object_mut().filter(|o| o.contains_key("model")) {
            o.insert("model".into(), json!(model));
        }
        let mut pointers = Vec::new();
        collect_pointers(&v, String::new(), &mut pointers);
        for (p, pointer) in pointers.iter().enumerate().skip(1) {
            for (k, value) in sweep_values().into_iter().enumerate() {
                // Each field gets a different share of the values.
                if (p + k) % stride != 0 {
                    continue;
                }
                let mut body = v.clone();
                if let Some(slot) = body.pointer_mut(pointer) {
                    *slot = value;
                }
                let body = body.to_string().into_bytes();
                let (content_type, answer) = answer_corpus(&mut r, model);
                let case = Case {
                    seed: 0,
                    config: 0,
                    side: Side::Standalone,
                    plan_request: None,
                    position: None,
                    plan_mutation: None,
                    request_headers: [
                        (":method", "POST"),
                        (":path", path),
                        (":authority", "gateway.local"),
                        ("content-type", "application/json"),
                        ("x-caller", "team/api"),
                    ]
                    .iter()
                    .map(|(n, v)| (n.to_string(), v.to_string()))
                    .collect(),
                    properties: Vec::new(),
                    body: Bytes(body.clone()),
                    failing: Vec::new(),
                    shared: Faults::None,
                    steps: vec![
                        Step::RequestHeaders {
                            end_of_stream: false,
                        },
                        Step::RequestBody {
                            take: body.len(),
                            extra: 0,
                            end_of_stream: true,
                        },
                        Step::ResponseHeaders {
                            status: "200".into(),
                            headers: vec![("content-type".into(), content_type.into())],
                            details: Some("via_upstream".into()),
                            end_of_stream: false,
                        },
                        Step::ResponseBody {
                            chunk: Bytes(answer),
                            extra: 0,
                            end_of_stream: true,
                        },
                        Step::Done,
                    ],
                };
                let what = format!("sweep of {path} for {model}: {pointer}");
                run_checked(&configs, &case, &what);
                runs += 1;
            }
        }
    }
    runs
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// The fixed seeds of the quick run.
const QUICK_BASE: u64 = 0x6d65_7368_6c6c_6d00;
const QUICK_CASES: u64 = 4000;

#[test]
fn fuzz_both_halves_with_hostile_inputs() {
    let started = Instant::now();
    let reached = fuzz(QUICK_BASE, QUICK_CASES);
    eprintln!(
        "fuzz: {QUICK_CASES} cases in {:?}: {reached:?}",
        started.elapsed()
    );
}

#[test]
fn fuzz_every_request_field_with_every_wrong_type() {
    let started = Instant::now();
    let runs = sweep(4);
    eprintln!("fuzz sweep: {runs} requests in {:?}", started.elapsed());
}

#[test]
#[ignore = "long run: MESHLLM_FUZZ_CASES=N (and MESHLLM_FUZZ_SEED) cargo test --lib fuzz -- --ignored"]
fn fuzz_long_run() {
    let cases = env_u64("MESHLLM_FUZZ_CASES").unwrap_or(100_000);
    let base = env_u64("MESHLLM_FUZZ_SEED").unwrap_or(QUICK_BASE + QUICK_CASES);
    let started = Instant::now();
    let swept = sweep(1);
    let reached = fuzz(base, cases);
    eprintln!("fuzz sweep: {swept} requests");
    eprintln!(
        "fuzz: {cases} cases from seed base {base} in {:?}: {reached:?}",
        started.elapsed()
    );
}

#[test]
fn the_generator_is_deterministic() {
    let a = format!("{:?}", gen_case(case_seed(QUICK_BASE, 17)));
    let b = format!("{:?}", gen_case(case_seed(QUICK_BASE, 17)));
    assert_eq!(a, b);
}
