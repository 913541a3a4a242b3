//! Whether a request may be cached, and the key its answer is kept under:
//! the caller's scope, its API, the model after aliases, streamed or not,
//! the answer guardrails it gets, and its body normalized (keys sorted,
//! fields that do not change the answer left out).

use serde_json::{Map, Value};

use crate::cache::policy::CacheConfig;
use crate::core::schema::Schema;
use crate::core::sha256::Sha256;

/// Body fields that never change the answer: identity, accounting and
/// the provider's own prompt-cache hints. `model` is keyed by its public
/// name; `stream` by the request's streaming flag.
const IGNORED_FIELDS: &[&str] = &[
    "model",
    "stream",
    "user",
    "metadata",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "service_tier",
];

/// Why a request is neither looked up nor stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bypass {
    /// The caller said `Cache-Control: no-store`.
    NoStore,
    /// Sampled above temperature 0 (or at the provider's default), for a
    /// model not in `sampled`.
    Sampled,
    /// It offers tools, and `tool_turns` is off.
    Tools,
    /// An API whose answers are not kept (Responses: stored server-side).
    Api,
    /// The body is not a JSON object.
    Unreadable,
}

impl Bypass {
    pub fn name(self) -> &'static str {
        match self {
            Bypass::NoStore => "no-store",
            Bypass::Sampled => "sampled",
            Bypass::Tools => "tools",
            Bypass::Api => "api",
            Bypass::Unreadable => "unreadable",
        }
    }
}

/// A request as the cache reads it.
pub struct Request<'a> {
    pub caller: Schema,
    /// Embeddings rather than a chat call (deterministic, toolless).
    pub embeddings: bool,
    /// The public name the request resolved to (a namespace alias resolved).
    pub model: &'a str,
    pub stream: bool,
    /// Who may share the answer (see `policy::Scope`).
    pub scope: &'a str,
    /// The answer guardrails the caller gets: an answer screened by other
    /// rules is another answer.
    pub answer_guard: &'a [usize],
    pub body: &'a [u8],
}

/// The request's key, or why it is not cached.
pub fn key(config: &CacheConfig, req: &Request) -> Result<[u8; 32], Bypass> {
    if req.caller == Schema::Responses {
        return Err(Bypass::Api);
    }
    let Ok(Value::Object(mut body)) = serde_json::from_slice::<Value>(req.body) else {
        return Err(Bypass::Unreadable);
    };
    if !req.embeddings {
        if !config.tool_turns && offers_tools(&body) {
            return Err(Bypass::Tools);
        }
        if !config.caches_sampled(req.model) && !greedy(req.caller, &body) {
            return Err(Bypass::Sampled);
        }
    }
    for field in IGNORED_FIELDS {
        body.remove(*field);
    }
    let mut body = Value::Object(body);
    whole_numbers(&mut body);
    // serde_json's maps are ordered by key: equal documents serialize alike.
    let canonical = serde_json::to_vec(&body).map_err(|_| Bypass::Unreadable)?;
    let mut h = Sha256::new();
    for part in [
        b"meshllm-cache-1".as_slice(),
        req.scope.as_bytes(),
        format!("{:?}", req.caller).as_bytes(),
        if req.embeddings {
            b"embeddings"
        } else {
            b"chat"
        },
        req.model.as_bytes(),
        if req.stream { b"stream" } else { b"whole" },
        format!("{:?}", req.answer_guard).as_bytes(),
    ] {
        h.update(&(part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.update(&canonical);
    Ok(h.finish())
}

/// `0.0` and `0` are the same JSON number: whole floats are written as
/// integers, so both spellings share a key.
fn whole_numbers(v: &mut Value) {
    match v {
        Value::Number(n) if n.is_f64() => {
            if let Some(f) = n.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15) {
                *v = Value::from(f as i64);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(whole_numbers),
        Value::Object(map) => map.values_mut().for_each(whole_numbers),
        _ => {}
    }
}

fn offers_tools(body: &Map<String, Value>) -> bool {
    ["tools", "functions"].iter().any(|f| match body.get(*f) {
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Null) | None => false,
        Some(_) => true,
    })
}

/// Sampling at temperature 0: the same request gets the same answer (as
/// far as providers promise it).
fn greedy(caller: Schema, body: &Map<String, Value>) -> bool {
    let temperature = match caller {
        Schema::Gemini => body
            .get("generationConfig")
            .or_else(|| body.get("generation_config"))
            .and_then(|g| g.get("temperature")),
        Schema::Converse => body
            .get("inferenceConfig")
            .and_then(|g| g.get("temperature")),
        _ => body.get("temperature"),
    };
    temperature.and_then(Value::as_f64) == Some(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::policy::compile_cache;
    use serde_json::json;

    fn config(extra: Value) -> CacheConfig {
        compile_cache(Some(&extra), &|_| true).unwrap().unwrap()
    }

    fn req<'a>(caller: Schema, body: &'a [u8], scope: &'a str) -> Request<'a> {
        Request {
            caller,
            embeddings: false,
            model: "gpt",
            stream: false,
            scope,
            answer_guard: &[],
            body,
        }
    }

    fn chat(extra: Value) -> Vec<u8> {
        let mut doc = json!({"model": "gpt", "temperature": 0,
            "messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            doc[k] = v.clone();
        }
        serde_json::to_vec(&doc).unwrap()
    }

    #[test]
    fn equal_requests_share_a_key_whatever_their_order_or_identity_fields() {
        let c = config(json!({}));
        let a = chat(json!({"user": "alice", "metadata": {"x": 1}}));
        let b = br#"{"messages":[{"content":"hi","role":"user"}],"temperature":0.0,"model":"alias","stream":false}"#;
        assert_eq!(
            key(&c, &req(Schema::OpenAi, &a, "team-a")),
            key(&c, &req(Schema::OpenAi, b, "team-a"))
        );
    }

    #[test]
    fn scope_model_stream_api_guard_and_content_change_the_key() {
        let c = config(json!({}));
        let body = chat(json!({}));
        let base = key(&c, &req(Schema::OpenAi, &body, "team-a")).unwrap();
        assert_ne!(
            base,
            key(&c, &req(Schema::OpenAi, &body, "team-b")).unwrap()
        );
        assert_ne!(
            base,
            key(&c, &req(Schema::Anthropic, &body, "team-a")).unwrap()
        );
        let mut r = req(Schema::OpenAi, &body, "team-a");
        r.stream = true;
        assert_ne!(base, key(&c, &r).unwrap());
        let mut r = req(Schema::OpenAi, &body, "team-a");
        r.model = "other";
        assert_ne!(base, key(&c, &r).unwrap());
        let mut r = req(Schema::OpenAi, &body, "team-a");
        r.answer_guard = &[0];
        assert_ne!(base, key(&c, &r).unwrap());
        let other = chat(json!({"max_tokens": 5}));
        assert_ne!(
            base,
            key(&c, &req(Schema::OpenAi, &other, "team-a")).unwrap()
        );
        // Scope and model cannot run into each other.
        let mut r = req(Schema::OpenAi, &body, "team-ag");
        r.model = "pt";
        assert_ne!(base, key(&c, &r).unwrap());
    }

    #[test]
    fn sampled_tool_turns_and_responses_are_not_cached_unless_allowed() {
        let c = config(json!({}));
        let sampled = chat(json!({"temperature": 0.7}));
        let unset = br#"{"model":"gpt","messages":[]}"#;
        let tools = chat(json!({"tools": [{"type": "function"}]}));
        let no_tools = chat(json!({"tools": []}));
        let r = |b| key(&c, &req(Schema::OpenAi, b, "ns"));
        assert_eq!(r(&sampled), Err(Bypass::Sampled));
        assert_eq!(r(unset), Err(Bypass::Sampled));
        assert_eq!(r(&tools), Err(Bypass::Tools));
        assert!(r(&no_tools).is_ok());
        assert_eq!(r(b"[1]"), Err(Bypass::Unreadable));
        assert_eq!(r(b"{no"), Err(Bypass::Unreadable));
        assert_eq!(
            key(&c, &req(Schema::Responses, &no_tools, "ns")),
            Err(Bypass::Api)
        );
        let open = config(json!({"sampled": ["gpt"], "tool_turns": true}));
        assert!(key(&open, &req(Schema::OpenAi, &sampled, "ns")).is_ok());
        assert!(key(&open, &req(Schema::OpenAi, &tools, "ns")).is_ok());
        // Embeddings are deterministic whatever they say.
        let mut e = req(Schema::OpenAi, br#"{"model":"e","input":"x"}"#, "ns");
        e.embeddings = true;
        assert!(key(&c, &e).is_ok());
    }

    #[test]
    fn gemini_and_converse_read_their_own_temperature() {
        let c = config(json!({}));
        let g = br#"{"contents":[],"generationConfig":{"temperature":0}}"#;
        let g_sampled = br#"{"contents":[],"generationConfig":{"temperature":1}}"#;
        assert!(key(&c, &req(Schema::Gemini, g, "ns")).is_ok());
        assert_eq!(
            key(&c, &req(Schema::Gemini, g_sampled, "ns")),
            Err(Bypass::Sampled)
        );
        let a = br#"{"model":"m","temperature":0.0,"messages":[]}"#;
        assert!(key(&c, &req(Schema::Anthropic, a, "ns")).is_ok());
        let b = br#"{"messages":[],"inferenceConfig":{"temperature":0}}"#;
        assert!(key(&c, &req(Schema::Converse, b, "ns")).is_ok());
    }
}

#[cfg(test)]
mod timing {
    use super::*;
    use crate::cache::policy::compile_cache;

    #[test]
    #[ignore]
    fn time_key_on_100kb() {
        let c = compile_cache(Some(&serde_json::json!({"sampled": true})), &|_| true)
            .unwrap()
            .unwrap();
        let text = "The quick brown fox jumps over the lazy dog. ".repeat(2300);
        let body = serde_json::to_vec(&serde_json::json!({"model": "m",
            "messages": [{"role": "user", "content": text}]}))
        .unwrap();
        let r = Request {
            caller: Schema::OpenAi,
            embeddings: false,
            model: "m",
            stream: false,
            scope: "ns",
            answer_guard: &[],
            body: &body,
        };
        let n = 50;
        let t = std::time::Instant::now();
        for _ in 0..n {
            std::hint::black_box(key(&c, &r).unwrap());
        }
        let all = t.elapsed() / n;
        let t = std::time::Instant::now();
        for _ in 0..n {
            let v: Value = serde_json::from_slice(&body).unwrap();
            std::hint::black_box(serde_json::to_vec(&v).unwrap());
        }
        let json = t.elapsed() / n;
        let t = std::time::Instant::now();
        for _ in 0..n {
            let mut h = Sha256::new();
            h.update(&body);
            std::hint::black_box(h.finish());
        }
        let sha = t.elapsed() / n;
        println!(
            "{} bytes: key {all:?}, parse+write {json:?}, sha256 {sha:?}",
            body.len()
        );
    }
}
