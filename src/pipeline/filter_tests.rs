//! Native tests of the filter against a mocked host (the pipeline of `router.rs` and `attempt.rs`).

use std::collections::HashMap;
use std::rc::Rc;

use serde_json::Value;

use super::*;
use crate::access::namespace_policy;
use crate::config::testing::{
    self, AWS_ACCESS_KEY_ID, AZURE_KEY, GEMINI_KEY, GROQ_KEY, OPENAI_KEY,
};
use crate::config::Config;
use crate::host::mock::{set_header, MockHost, MockShared, Op, Sent, SETTERS};
use crate::host::CalloutAnswer;
use crate::pipeline::handoff::FAILOVER_CLUSTER;
use crate::pipeline::handoff::{
    ANSWER_STATUS_PROPERTY, ATTEMPTS_RESPONSE_HEADER, CALLER_API_HEADER, CLUSTER_HEADER,
    MODEL_RESPONSE_HEADER, PLAN_PROPERTY, PROVIDER_RESPONSE_HEADER, USAGE_PROPERTY,
};
use crate::pipeline::point::{ANTHROPIC_HEADERS, CLIENT_CREDENTIAL_HEADERS};
use crate::pipeline::respond::PROVIDER_RATE_LIMIT_HEADERS;
use crate::pipeline::state::{AttemptEnd, ClusterChoice, Forward};
use crate::routing::health::HealthPolicy;

/// Which filter a test drives: the listener half without failover, with
/// it, or the upstream half.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Standalone,
    Router,
    Attempt,
}

impl Filter {
    fn new(config: Rc<Config>, role: Role) -> Self {
        match role {
            Role::Standalone => Filter::Listener(Router::new(config, false)),
            Role::Router => Filter::Listener(Router::new(config, true)),
            Role::Attempt => Filter::upstream(config),
        }
    }
}

/// The listener half a test drives.
fn router(f: &Filter) -> &Router {
    match f {
        Filter::Listener(r) => r,
        Filter::Upstream(_) => panic!("a listener half was expected"),
    }
}

/// The listener half serves its one target inline through the first
/// position's cluster (failover on, one target left).
fn direct(f: &Filter) -> bool {
    matches!(
        &router(f).forward,
        Forward::Inline(a) if a.place == crate::pipeline::state::Place::Inline(ClusterChoice::FirstPosition)
    )
}

/// The `meshllm_requests_total` series a test's requests produced.
fn requests_counted(host: &MockHost) -> HashMap<String, u64> {
    host.counters
        .iter()
        .filter(|(k, _)| k.starts_with("meshllm_requests_total;"))
        .map(|(k, v)| (k.clone(), *v))
        .collect()
}

/// One `meshllm_requests_total` series of an unidentified caller's chat call.
fn requests_metric(
    provider: &str,
    request_model: &str,
    response_model: &str,
    error: Option<&str>,
) -> String {
    let mut name = format!(
        "meshllm_requests_total;caller_namespace=unknown;caller_service=unknown;\
         gen_ai_operation_name=chat;gen_ai_provider_name={provider};\
         gen_ai_request_model={request_model};gen_ai_response_model={response_model}"
    );
    if let Some(e) = error {
        name.push_str(";error_type=");
        name.push_str(e);
    }
    name
}

// ---------------------------------------------------------------------------
// Configuration and drivers
// ---------------------------------------------------------------------------

const MAX_BYTES: usize = 4096;

const CONFIG: &str = r#"{
  "providers": [
    {"name": "openai", "kind": "openai", "api_key_env": "OPENAI_API_KEY"},
    {"name": "azure", "kind": "azure_openai", "base_url": "https://res.openai.azure.com",
     "api_version": "2024-10-21", "api_key_env": "AZURE_KEY"},
    {"name": "groq", "kind": "openai_compatible", "base_url": "https://api.groq.com/openai/v1",
     "api_key_env": "GROQ_API_KEY",
     "headers": {"X-Title": "meshllm", "HTTP-Referer": "https://example.test"}},
    {"name": "nokey", "kind": "openai_compatible", "base_url": "https://nokey.example/v1",
     "api_key_env": "NOKEY_API_KEY"},
    {"name": "ollama", "kind": "openai_compatible", "base_url": "http://ollama.local:11434/v1",
     "cluster": "ollama_local"}
  ],
  "models": [
    {"name": "gpt-4o-mini", "provider": "openai", "aliases": ["mini"]},
    {"name": "smart", "provider": "openai", "model": "gpt-4.1"},
    {"name": "text-embedding-3-small", "provider": "openai"},
    {"name": "azure-gpt-4o", "provider": "azure", "model": "gpt-4o", "deployment": "gpt4o-prod"},
    {"name": "fast", "provider": "groq", "model": "llama-3.1-8b-instant"},
    {"name": "broken", "provider": "nokey"},
    {"name": "local", "provider": "ollama", "model": "llama3.2"}
  ],
  "max_request_bytes": 4096
}"#;

fn config_from(doc: &str) -> Rc<Config> {
    Rc::new(testing::config(doc))
}

fn config() -> Rc<Config> {
    config_from(CONFIG)
}

/// A POST as a client sends it: credentials, compression, a forged cluster.
fn client_post(path: &str, body: &[u8]) -> MockHost {
    MockHost::new("POST", path)
        .with_header("content-type", "application/json")
        .with_header("content-length", &body.len().to_string())
        .with_header("authorization", "Bearer client-secret")
        .with_header("x-api-key", "client-x-api-key")
        .with_header("api-key", "client-api-key")
        .with_header("openai-organization", "org-client")
        .with_header("accept-encoding", "gzip, br")
        .with_header(CLUSTER_HEADER, "attacker_cluster")
        .with_header("user-agent", "test-sdk/1.0")
        .with_body(body)
}

/// Runs the request callbacks for a POST whose body arrives in one final chunk.
fn post(path: &str, body: &[u8]) -> (Filter, MockHost, Flow) {
    let mut host = client_post(path, body);
    let mut f = Filter::new(config(), Role::Standalone);
    assert_eq!(
        f.on_request_headers(&mut host, false),
        Flow::Pause,
        "headers of POST {path}"
    );
    let flow = f.on_request_body(&mut host, body.len(), true);
    (f, host, flow)
}

/// Runs the request headers callback for a request without a body.
fn bodiless(method: &str, path: &str) -> (Filter, MockHost, Flow) {
    let mut host = MockHost::new(method, path).with_header(CLUSTER_HEADER, "attacker_cluster");
    let mut f = Filter::new(config(), Role::Standalone);
    let flow = f.on_request_headers(&mut host, true);
    (f, host, flow)
}

/// A chat request for `model` that has been forwarded.
fn forwarded(model: &str) -> (Filter, MockHost) {
    let body = chat_body(&quote(model));
    let (f, host, flow) = post("/v1/chat/completions", body.as_bytes());
    assert_eq!(
        flow,
        Flow::Continue,
        "request for {model} was not forwarded: {:?}",
        host.sent
    );
    assert!(host.sent.is_empty());
    (f, host)
}

fn quote(s: &str) -> String {
    crate::core::json::quote(s)
}

/// A chat body with `model_json` spliced in as the model's value; the other
/// fields mention model names too, so a sloppy rewrite would show.
fn chat_body(model_json: &str) -> String {
    CHAT_TEMPLATE.replace("{MODEL}", model_json)
}

const CHAT_TEMPLATE: &str = "{ \"messages\": [{\"role\": \"user\", \"content\": \"Are you smart or mini? \\u00e9t\u{e9} \\\"model\\\"\"}],\n  \"model\" :  {MODEL} , \"temperature\": 0.25,\n  \"metadata\": {\"model\": \"mini\"}, \"stream\": false }";

const EMBED_TEMPLATE: &str =
    r#"{"input": ["smart", "mini"], "model": {MODEL}, "encoding_format": "float"}"#;

/// The error object of an OpenAI-shaped error body.
#[derive(Debug)]
struct ErrorFields {
    message: String,
    kind: String,
    param: Option<String>,
    code: Option<String>,
}

fn error_fields(body: &[u8]) -> ErrorFields {
    let v: Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(body)));
    let e = v
        .get("error")
        .and_then(Value::as_object)
        .unwrap_or_else(|| panic!("no error object in {v}"));
    for key in ["message", "type", "param", "code"] {
        assert!(e.contains_key(key), "error object lacks {key:?}: {v}");
    }
    ErrorFields {
        message: e["message"]
            .as_str()
            .expect("message is a string")
            .to_string(),
        kind: e["type"].as_str().expect("type is a string").to_string(),
        param: e["param"].as_str().map(str::to_string),
        code: e["code"].as_str().map(str::to_string),
    }
}

/// Asserts the request was not pointed anywhere.
fn assert_not_routed(host: &MockHost, original_path: &str) {
    assert_eq!(host.req(":path").as_deref(), Some(original_path));
    assert_eq!(host.req(":authority").as_deref(), Some("gateway.local"));
    assert_eq!(
        host.req(CLUSTER_HEADER),
        None,
        "cluster header left on {original_path}"
    );
    assert_eq!(host.request_body_replacements, 0);
}

// ---------------------------------------------------------------------------
// Local answers: /v1/models, unknown URLs, wrong methods
// ---------------------------------------------------------------------------

#[test]
fn models_list_is_answered_locally() {
    let cfg = config();
    for path in [
        "/v1/models",
        "/v1/models/",
        "/v1/models?limit=5",
        "/v1/models/?a=b&c=d",
    ] {
        let (_, host, flow) = bodiless("GET", path);
        assert_eq!(flow, Flow::Pause, "{path}");
        let sent = host.reply();
        assert_eq!(sent.status, 200, "{path}");
        assert_eq!(sent.body, cfg.models_list_body, "{path}");
        assert_eq!(
            sent.headers,
            vec![("content-type".to_string(), "application/json".to_string())],
            "{path}"
        );
        assert_eq!(sent.json()["object"], "list");
        assert_eq!(host.req(CLUSTER_HEADER), None, "{path}");
    }
}

#[test]
fn single_models_are_answered_locally() {
    let cfg = config();
    let cases: &[(&str, &str)] = &[
        ("/v1/models/gpt-4o-mini", "gpt-4o-mini"),
        ("/v1/models/mini", "mini"),
        ("/v1/models/fast/", "fast"),
        ("/v1/models/azure-gpt-4o?x=1", "azure-gpt-4o"),
        ("/v1/models/local/?x=1", "local"),
    ];
    for (path, id) in cases {
        let (_, host, flow) = bodiless("GET", path);
        assert_eq!(flow, Flow::Pause, "{path}");
        let sent = host.reply();
        assert_eq!(sent.status, 200, "{path}");
        assert_eq!(Some(sent.body.as_slice()), cfg.model_body(id), "{path}");
        assert_eq!(sent.header("content-type"), Some("application/json"));
        assert_eq!(sent.json()["id"], *id);
    }
}

#[test]
fn unknown_single_model_is_404_model_not_found() {
    for (path, id) in [
        ("/v1/models/gpt-5", "gpt-5"),
        ("/v1/models/llama-3.1-8b-instant", "llama-3.1-8b-instant"),
        ("/v1/models/GPT-4O-MINI/", "GPT-4O-MINI"),
    ] {
        let (_, host, flow) = bodiless("GET", path);
        assert_eq!(flow, Flow::Pause);
        let sent = host.reply();
        assert_eq!(sent.status, 404, "{path}");
        assert_eq!(sent.header("content-type"), Some("application/json"));
        let e = error_fields(&sent.body);
        assert_eq!(e.code.as_deref(), Some("model_not_found"), "{path}");
        assert_eq!(e.param.as_deref(), Some("model"));
        assert_eq!(e.kind, "invalid_request_error");
        assert!(e.message.contains(&format!("`{id}`")), "{}", e.message);
    }
}

#[test]
fn unknown_urls_are_404_unknown_url() {
    for (method, path, shown) in [
        ("GET", "/", "/"),
        ("POST", "/v1/completion", "/v1/completion"),
        ("POST", "/v1/images/generate", "/v1/images/generate"),
        ("POST", "/v2/chat/completions", "/v2/chat/completions"),
        (
            "POST",
            "/v1/chat/completions/extra",
            "/v1/chat/completions/extra",
        ),
        ("GET", "/v1/models//", "/v1/models//"),
        ("GET", "/v1/model", "/v1/model"),
        ("POST", "/V1/CHAT/COMPLETIONS", "/V1/CHAT/COMPLETIONS"),
        ("GET", "/v1/unknown?api_key=query-secret", "/v1/unknown"),
    ] {
        let (_, host, flow) = bodiless(method, path);
        assert_eq!(flow, Flow::Pause, "{method} {path}");
        let sent = host.reply();
        assert_eq!(sent.status, 404, "{method} {path}");
        assert_eq!(sent.header("content-type"), Some("application/json"));
        let e = error_fields(&sent.body);
        assert_eq!(e.code.as_deref(), Some("unknown_url"), "{method} {path}");
        assert_eq!(e.kind, "invalid_request_error");
        assert_eq!(e.param, None);
        assert!(
            e.message.contains(&format!("{method} {shown}.")),
            "{method} {path}: {}",
            e.message
        );
        // The query string is not echoed back.
        assert!(!e.message.contains("query-secret"), "{}", e.message);
        assert_not_routed(&host, path);
    }
}

#[test]
fn missing_path_and_method_are_404() {
    let mut host = MockHost::default();
    let mut f = Filter::new(config(), Role::Standalone);
    assert_eq!(f.on_request_headers(&mut host, true), Flow::Pause);
    let sent = host.reply();
    assert_eq!(sent.status, 404);
    assert_eq!(
        error_fields(&sent.body).code.as_deref(),
        Some("unknown_url")
    );
}

#[test]
fn wrong_method_is_405_with_allow() {
    for (method, path, allow) in [
        ("GET", "/v1/chat/completions", "POST"),
        ("PUT", "/v1/chat/completions?x=1", "POST"),
        ("GET", "/v1/embeddings/", "POST"),
        ("POST", "/v1/models", "GET"),
        ("HEAD", "/v1/models", "GET"),
        ("DELETE", "/v1/models/mini", "GET"),
        ("post", "/v1/chat/completions", "POST"),
    ] {
        let (_, host, flow) = bodiless(method, path);
        assert_eq!(flow, Flow::Pause, "{method} {path}");
        let sent = host.reply();
        assert_eq!(sent.status, 405, "{method} {path}");
        assert_eq!(
            sent.headers,
            vec![
                ("content-type".to_string(), "application/json".to_string()),
                ("allow".to_string(), allow.to_string()),
            ]
        );
        let e = error_fields(&sent.body);
        assert_eq!(e.code.as_deref(), Some("method_not_allowed"));
        assert!(
            e.message.contains(method) && e.message.contains(allow),
            "{}",
            e.message
        );
        assert_not_routed(&host, path);
    }
}

#[test]
fn llm_call_without_body_is_400_missing_body() {
    for path in ["/v1/chat/completions", "/v1/embeddings"] {
        let (_, host, flow) = bodiless("POST", path);
        assert_eq!(flow, Flow::Pause);
        let sent = host.reply();
        assert_eq!(sent.status, 400, "{path}");
        let e = error_fields(&sent.body);
        assert_eq!(e.code.as_deref(), Some("missing_body"));
        assert_eq!(e.kind, "invalid_request_error");
        assert_not_routed(&host, path);
    }
}

// ---------------------------------------------------------------------------
// Request body flow
// ---------------------------------------------------------------------------

#[test]
fn body_is_buffered_until_end_of_stream() {
    let body = chat_body("\"mini\"");
    let mut host = client_post("/v1/chat/completions", body.as_bytes());
    let mut f = Filter::new(config(), Role::Standalone);
    assert_eq!(f.on_request_headers(&mut host, false), Flow::Pause);
    assert!(host.sent.is_empty());
    assert_eq!(f.on_request_body(&mut host, 10, false), Flow::Pause);
    assert_eq!(f.on_request_body(&mut host, 40, false), Flow::Pause);
    // Nothing decided while the body is incomplete.
    assert_eq!(host.req(":path").as_deref(), Some("/v1/chat/completions"));
    assert_eq!(
        host.req("authorization").as_deref(),
        Some("Bearer client-secret")
    );
    assert_eq!(
        f.on_request_body(&mut host, body.len(), true),
        Flow::Continue
    );
    assert!(host.sent.is_empty());
    assert_eq!(host.req(CLUSTER_HEADER).as_deref(), Some("openai"));
    // Later callbacks pass through.
    assert_eq!(
        f.on_request_body(&mut host, body.len(), true),
        Flow::Continue
    );
    assert_eq!(f.on_request_trailers(&mut host, body.len()), Flow::Continue);
    assert_eq!(host.request_body_replacements, 1);
}

#[test]
fn body_over_the_limit_is_413() {
    // Over the limit on a partial chunk: rejected before the body is complete.
    for (size, end) in [
        (MAX_BYTES + 1, false),
        (MAX_BYTES + 1, true),
        (10 * MAX_BYTES, false),
    ] {
        let body = vec![b' '; size];
        let mut host = client_post("/v1/chat/completions", &body);
        let mut f = Filter::new(config(), Role::Standalone);
        assert_eq!(f.on_request_headers(&mut host, false), Flow::Pause);
        assert_eq!(
            f.on_request_body(&mut host, size, end),
            Flow::Pause,
            "{size} {end}"
        );
        let sent = host.reply();
        assert_eq!(sent.status, 413);
        let e = error_fields(&sent.body);
        assert_eq!(e.code.as_deref(), Some("request_too_large"));
        assert!(e.message.contains("4096 bytes"), "{}", e.message);
        // Later chunks are let through untouched; no second reply.
        assert_eq!(
            f.on_request_body(&mut host, size + 10, true),
            Flow::Continue
        );
        assert_eq!(host.sent.len(), 1);
        assert_not_routed(&host, "/v1/chat/completions");
        f.on_done(&mut host);
        assert_eq!(
            requests_counted(&host),
            HashMap::from([(requests_metric("none", "none", "none", Some("413")), 1)])
        );
    }
}

#[test]
fn body_exactly_at_the_limit_is_accepted() {
    let head = r#"{"model":"gpt-4o-mini","messages":[],"pad":""#;
    let tail = r#""}"#;
    let pad = "x".repeat(MAX_BYTES - head.len() - tail.len());
    let body = format!("{head}{pad}{tail}");
    assert_eq!(body.len(), MAX_BYTES);
    let (_, host, flow) = post("/v1/chat/completions", body.as_bytes());
    assert_eq!(flow, Flow::Continue, "{:?}", host.sent);
    assert!(host.sent.is_empty());
    assert_eq!(host.req(CLUSTER_HEADER).as_deref(), Some("openai"));
}

#[test]
fn trailers_end_the_request() {
    let body = EMBED_TEMPLATE.replace("{MODEL}", "\"mini\"");
    let mut host = client_post("/v1/embeddings", body.as_bytes());
    let mut f = Filter::new(config(), Role::Standalone);
    assert_eq!(f.on_request_headers(&mut host, false), Flow::Pause);
    assert_eq!(f.on_request_body(&mut host, body.len(), false), Flow::Pause);
    assert_eq!(host.req(CLUSTER_HEADER), None);
    assert_eq!(f.on_request_trailers(&mut host, body.len()), Flow::Continue);
    assert!(host.sent.is_empty(), "{:?}", host.sent);
    assert_eq!(host.req(CLUSTER_HEADER).as_deref(), Some("openai"));
    assert_eq!(host.req(":path").as_deref(), Some("/v1/embeddings"));
    assert_eq!(host.req(":authority").as_deref(), Some("api.openai.com"));
    let want = EMBED_TEMPLATE.replace("{MODEL}", "\"gpt-4o-mini\"");
    assert_eq!(String::from_utf8(host.request_body.clone()).unwrap(), want);
    assert_eq!(host.req("content-length"), Some(want.len().to_string()));
}

#[test]
fn trailers_with_a_bad_body_are_rejected() {
    let body = br#"{"model":"mini"}"#;
    let mut host = client_post("/v1/chat/completions", body);
    let mut f = Filter::new(config(), Role::Standalone);
    assert_eq!(f.on_request_headers(&mut host, false), Flow::Pause);
    assert_eq!(f.on_request_body(&mut host, body.len(), false), Flow::Pause);
    assert_eq!(f.on_request_trailers(&mut host, body.len()), Flow::Pause);
    let e = error_fields(&host.reply().body);
    assert_eq!(e.param.as_deref(), Some("messages"));
}

#[test]
fn trailers_outside_a_body_read_pass() {
    let (mut f, mut host) = forwarded("mini");
    let before = host.request_headers.clone();
    assert_eq!(f.on_request_trailers(&mut host, 0), Flow::Continue);
    assert_eq!(host.request_headers, before);
    let (mut f, mut host, _) = bodiless("GET", "/v1/models");
    assert_eq!(f.on_request_trailers(&mut host, 0), Flow::Continue);
    assert_eq!(host.sent.len(), 1);
}

// ---------------------------------------------------------------------------
// Request validation
// ---------------------------------------------------------------------------

/// (path, body, status, code, param, text in the message)
type BadBody = (
    &'static str,
    &'static str,
    u16,
    &'static str,
    Option<&'static str>,
    &'static str,
);

#[test]
fn invalid_bodies_are_rejected_in_openai_shape() {
    const CHAT: &str = "/v1/chat/completions";
    const EMB: &str = "/v1/embeddings";
    #[rustfmt::skip]
    let cases: &[BadBody] = &[
        (CHAT, "", 400, "invalid_json", None, "not a valid JSON object"),
        (CHAT, r#"{"model":"#, 400, "invalid_json", None, "not a valid JSON object"),
        (CHAT, "model=mini", 400, "invalid_json", None, "not a valid JSON object"),
        (CHAT, r#"[{"model":"mini"}]"#, 400, "invalid_json", None, "not a valid JSON object"),
        (CHAT, r#"{"model":"mini","messages":[]} {}"#, 400, "invalid_json", None, "not a valid JSON object"),
        (CHAT, r#"{"model":"mini","messages":[],}"#, 400, "invalid_json", None, "not a valid JSON object"),
        (CHAT, "{}", 400, "missing_required_parameter", Some("model"), "model parameter"),
        (CHAT, r#"{"messages":[]}"#, 400, "missing_required_parameter", Some("model"), "model parameter"),
        (CHAT, r#"{"messages":[],"metadata":{"model":"mini"}}"#, 400, "missing_required_parameter", Some("model"), "model parameter"),
        (CHAT, r#"{"model":5,"messages":[]}"#, 400, "invalid_type", Some("model"), "expected a string, but got a number"),
        (CHAT, r#"{"model":null,"messages":[]}"#, 400, "invalid_type", Some("model"), "got null"),
        (CHAT, r#"{"model":["mini"],"messages":[]}"#, 400, "invalid_type", Some("model"), "got an array"),
        (CHAT, r#"{"model":"mini"}"#, 400, "missing_required_parameter", Some("messages"), "'messages'"),
        (CHAT, r#"{"model":"mini","messages":"hi"}"#, 400, "invalid_type", Some("messages"), "expected an array, but got a string"),
        (CHAT, r#"{"model":"mini","messages":{"role":"user"}}"#, 400, "invalid_type", Some("messages"), "got an object"),
        (EMB, r#"{"model":"text-embedding-3-small"}"#, 400, "missing_required_parameter", Some("input"), "'input'"),
        (EMB, r#"{"input":"hi"}"#, 400, "missing_required_parameter", Some("model"), "model parameter"),
        (CHAT, r#"{"model":"mini","model":"fast","messages":[]}"#, 400, "duplicate_parameter", Some("model"), "'model' is given more than once"),
        (CHAT, r#"{"model":"mini","mod\u0065l":"fast","messages":[]}"#, 400, "duplicate_parameter", Some("model"), "'model' is given more than once"),
        (CHAT, r#"{"model":"mini","messages":[],"messages":[]}"#, 400, "duplicate_parameter", Some("messages"), "'messages'"),
        (CHAT, r#"{"model":"mini","messages":[],"stream":"true"}"#, 400, "invalid_type", Some("stream"), "expected a boolean, but got a string"),
        (CHAT, r#"{"model":"mini","messages":[],"stream":1}"#, 400, "invalid_type", Some("stream"), "got a number"),
        (CHAT, r#"{"model":"mini","messages":[],"stream":true,"stream":false}"#, 400, "duplicate_parameter", Some("stream"), "'stream'"),
        (CHAT, r#"{"model":"gpt-5","messages":[]}"#, 404, "model_not_found", Some("model"), "`gpt-5` does not exist"),
        (CHAT, r#"{"model":"llama-3.1-8b-instant","messages":[]}"#, 404, "model_not_found", Some("model"), "`llama-3.1-8b-instant`"),
        (CHAT, r#"{"model":"","messages":[]}"#, 404, "model_not_found", Some("model"), "``"),
        (CHAT, r#"{"model":"Mini","messages":[]}"#, 404, "model_not_found", Some("model"), "`Mini`"),
        (EMB, r#"{"model":"nope","input":"x"}"#, 404, "model_not_found", Some("model"), "`nope`"),
    ];
    for &(path, body, status, code, param, message) in cases {
        let (mut f, mut host, flow) = post(path, body.as_bytes());
        let what = format!("{path} {body}");
        assert_eq!(flow, Flow::Pause, "{what}");
        let sent = host.reply().clone();
        assert_eq!(sent.status, status, "{what}: {}", sent.text());
        assert_eq!(
            sent.header("content-type"),
            Some("application/json"),
            "{what}"
        );
        let e = error_fields(&sent.body);
        assert_eq!(e.code.as_deref(), Some(code), "{what}: {e:?}");
        assert_eq!(e.param.as_deref(), param, "{what}: {e:?}");
        assert_eq!(e.kind, "invalid_request_error", "{what}");
        assert!(e.message.contains(message), "{what}: {:?}", e.message);
        // Nothing forwarded, the client's own headers untouched except the
        // forged cluster.
        assert_not_routed(&host, path);
        assert_eq!(
            host.req("authorization").as_deref(),
            Some("Bearer client-secret")
        );
        assert_eq!(host.request_body, body.as_bytes(), "{what}");
        // Response callbacks for the local reply change nothing.
        host.respond(
            status,
            &[("content-type", "application/json")],
            &sent.body,
            Some("wasm"),
        );
        assert_eq!(f.on_response_headers(&mut host, false), Flow::Continue);
        let len = host.response_body.len();
        assert_eq!(f.on_response_body(&mut host, len, true), Flow::Continue);
        assert_eq!(host.response_body_replacements, 0);
        f.on_done(&mut host);
        // The model is a label only when the config knows it.
        let requested = if status == 404 { "_OTHER" } else { "none" };
        let name = requests_metric("none", requested, "none", Some(&status.to_string())).replace(
            "=chat;",
            if path == EMB {
                "=embeddings;"
            } else {
                "=chat;"
            },
        );
        assert_eq!(
            requests_counted(&host),
            HashMap::from([(name, 1)]),
            "{what}"
        );
    }
}

#[test]
fn valid_variations_are_accepted() {
    for (path, body) in [
        (
            "/v1/chat/completions",
            r#"{"model":"mini","messages":[],"stream":true}"#,
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"mini","messages":[],"stream":null}"#,
        ),
        (
            "/v1/chat/completions",
            "\n\t {\"model\":\"mini\",\"messages\":[]}  \r\n",
        ),
        (
            "/v1/chat/completions?api-version=x",
            r#"{"model":"mini","messages":[]}"#,
        ),
        ("/v1/chat/completions/", r#"{"model":"mini","messages":[]}"#),
        (
            "/v1/chat/completions",
            r#"{"model":"m\u0069ni","messages":[]}"#,
        ),
        (
            "/v1/chat/completions",
            r#"{"metadata":{"model":"x","model":"y"},"model":"mini","messages":[]}"#,
        ),
        ("/v1/embeddings", r#"{"model":"mini","input":"hello"}"#),
        ("/v1/embeddings", r#"{"model":"mini","input":[[1,2,3]]}"#),
    ] {
        let (_, host, flow) = post(path, body.as_bytes());
        assert_eq!(
            flow,
            Flow::Continue,
            "{path} {body}: {:?}",
            host.sent.first().map(Sent::text)
        );
        assert!(host.sent.is_empty());
        assert_eq!(host.req(CLUSTER_HEADER).as_deref(), Some("openai"));
        let want_path = if path.starts_with("/v1/embeddings") {
            "/v1/embeddings"
        } else {
            "/v1/chat/completions"
        };
        assert_eq!(
            host.req(":path").as_deref(),
            Some(want_path),
            "{path} {body}"
        );
        let v: Value = serde_json::from_slice(&host.request_body).unwrap();
        assert_eq!(v["model"], "gpt-4o-mini", "{body}");
    }
}

#[test]
fn provider_without_its_key_is_500_naming_the_variable() {
    let (mut f, mut host, flow) = post(
        "/v1/chat/completions",
        br#"{"model":"broken","messages":[]}"#,
    );
    assert_eq!(flow, Flow::Pause);
    let sent = host.reply();
    assert_eq!(sent.status, 500);
    let e = error_fields(&sent.body);
    assert_eq!(e.code.as_deref(), Some("provider_key_missing"));
    assert_eq!(e.kind, "server_error");
    assert!(e.message.contains("NOKEY_API_KEY"), "{}", e.message);
    assert!(e.message.contains("\"nokey\""), "{}", e.message);
    assert_not_routed(&host, "/v1/chat/completions");
    f.on_done(&mut host);
    assert_eq!(
        requests_counted(&host),
        HashMap::from([(requests_metric("nokey", "broken", "broken", Some("500")), 1)])
    );
}

// ---------------------------------------------------------------------------
// Routing
// ---------------------------------------------------------------------------

struct Route {
    path: &'static str,
    template: &'static str,
    requested: &'static str,
    upstream_model: &'static str,
    authority: &'static str,
    upstream_path: &'static str,
    cluster: &'static str,
    auth: Option<(&'static str, &'static str)>,
    extra: &'static [(&'static str, &'static str)],
}

const ROUTES: &[Route] = &[
    // openai, model renamed
    Route {
        path: "/v1/chat/completions",
        template: CHAT_TEMPLATE,
        requested: "smart",
        upstream_model: "gpt-4.1",
        authority: "api.openai.com",
        upstream_path: "/v1/chat/completions",
        cluster: "openai",
        auth: Some(("authorization", "Bearer sk-test-openai")),
        extra: &[],
    },
    // openai, through an alias
    Route {
        path: "/v1/chat/completions",
        template: CHAT_TEMPLATE,
        requested: "mini",
        upstream_model: "gpt-4o-mini",
        authority: "api.openai.com",
        upstream_path: "/v1/chat/completions",
        cluster: "openai",
        auth: Some(("authorization", "Bearer sk-test-openai")),
        extra: &[],
    },
    // azure_openai: deployment path, api-version, api-key header
    Route {
        path: "/v1/chat/completions",
        template: CHAT_TEMPLATE,
        requested: "azure-gpt-4o",
        upstream_model: "gpt-4o",
        authority: "res.openai.azure.com",
        upstream_path: "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21",
        cluster: "azure",
        auth: Some(("api-key", AZURE_KEY)),
        extra: &[],
    },
    // openai_compatible with a base path and extra headers
    Route {
        path: "/v1/chat/completions",
        template: CHAT_TEMPLATE,
        requested: "fast",
        upstream_model: "llama-3.1-8b-instant",
        authority: "api.groq.com",
        upstream_path: "/openai/v1/chat/completions",
        cluster: "groq",
        auth: Some(("authorization", "Bearer gsk-test-groq")),
        extra: &[
            ("x-title", "meshllm"),
            ("http-referer", "https://example.test"),
        ],
    },
    // openai_compatible without a key, port in the authority, own cluster
    Route {
        path: "/v1/chat/completions?debug=1",
        template: CHAT_TEMPLATE,
        requested: "local",
        upstream_model: "llama3.2",
        authority: "ollama.local:11434",
        upstream_path: "/v1/chat/completions",
        cluster: "ollama_local",
        auth: None,
        extra: &[],
    },
    // embeddings
    Route {
        path: "/v1/embeddings",
        template: EMBED_TEMPLATE,
        requested: "mini",
        upstream_model: "gpt-4o-mini",
        authority: "api.openai.com",
        upstream_path: "/v1/embeddings",
        cluster: "openai",
        auth: Some(("authorization", "Bearer sk-test-openai")),
        extra: &[],
    },
    Route {
        path: "/v1/embeddings",
        template: EMBED_TEMPLATE,
        requested: "fast",
        upstream_model: "llama-3.1-8b-instant",
        authority: "api.groq.com",
        upstream_path: "/openai/v1/embeddings",
        cluster: "groq",
        auth: Some(("authorization", "Bearer gsk-test-groq")),
        extra: &[
            ("x-title", "meshllm"),
            ("http-referer", "https://example.test"),
        ],
    },
    Route {
        path: "/v1/embeddings/",
        template: EMBED_TEMPLATE,
        requested: "azure-gpt-4o",
        upstream_model: "gpt-4o",
        authority: "res.openai.azure.com",
        upstream_path: "/openai/deployments/gpt4o-prod/embeddings?api-version=2024-10-21",
        cluster: "azure",
        auth: Some(("api-key", AZURE_KEY)),
        extra: &[],
    },
];

const PASSED_ROUTES: &[Route] = &[
    // Responses callers reach OpenAI and Azure OpenAI as themselves.
    Route {
        path: "/v1/responses",
        template: RESPONSES_TEMPLATE,
        requested: "smart",
        upstream_model: "gpt-4.1",
        authority: "api.openai.com",
        upstream_path: "/v1/responses",
        cluster: "openai",
        auth: Some(("authorization", "Bearer sk-test-openai")),
        extra: &[],
    },
    // Azure's v1 API: the deployment is the body's model.
    Route {
        path: "/v1/responses",
        template: RESPONSES_TEMPLATE,
        requested: "azure-gpt-4o",
        upstream_model: "gpt4o-prod",
        authority: "res.openai.azure.com",
        upstream_path: "/openai/v1/responses",
        cluster: "azure",
        auth: Some(("api-key", AZURE_KEY)),
        extra: &[],
    },
    Route {
        path: "/v1/completions",
        template: COMPLETIONS_TEMPLATE,
        requested: "fast",
        upstream_model: "llama-3.1-8b-instant",
        authority: "api.groq.com",
        upstream_path: "/openai/v1/completions",
        cluster: "groq",
        auth: Some(("authorization", "Bearer gsk-test-groq")),
        extra: &[
            ("x-title", "meshllm"),
            ("http-referer", "https://example.test"),
        ],
    },
    Route {
        path: "/v1/completions",
        template: COMPLETIONS_TEMPLATE,
        requested: "azure-gpt-4o",
        upstream_model: "gpt-4o",
        authority: "res.openai.azure.com",
        upstream_path: "/openai/deployments/gpt4o-prod/completions?api-version=2024-10-21",
        cluster: "azure",
        auth: Some(("api-key", AZURE_KEY)),
        extra: &[],
    },
    Route {
        path: "/v1/images/generations",
        template: IMAGE_TEMPLATE,
        requested: "mini",
        upstream_model: "gpt-4o-mini",
        authority: "api.openai.com",
        upstream_path: "/v1/images/generations",
        cluster: "openai",
        auth: Some(("authorization", "Bearer sk-test-openai")),
        extra: &[],
    },
    Route {
        path: "/v1/audio/speech",
        template: SPEECH_TEMPLATE,
        requested: "azure-gpt-4o",
        upstream_model: "gpt-4o",
        authority: "res.openai.azure.com",
        upstream_path: "/openai/deployments/gpt4o-prod/audio/speech?api-version=2024-10-21",
        cluster: "azure",
        auth: Some(("api-key", AZURE_KEY)),
        extra: &[],
    },
    Route {
        path: "/v1/moderations",
        template: MODERATION_TEMPLATE,
        requested: "smart",
        upstream_model: "gpt-4.1",
        authority: "api.openai.com",
        upstream_path: "/v1/moderations",
        cluster: "openai",
        auth: Some(("authorization", "Bearer sk-test-openai")),
        extra: &[],
    },
];

const RESPONSES_TEMPLATE: &str = r#"{"input": "smart or mini?", "model": {MODEL}, "store": true, "previous_response_id": "resp_1"}"#;
const COMPLETIONS_TEMPLATE: &str = r#"{"prompt": "smart", "model": {MODEL}, "max_tokens": 5}"#;
const IMAGE_TEMPLATE: &str = r#"{"prompt": "a mini cat", "model": {MODEL}, "n": 1}"#;
const SPEECH_TEMPLATE: &str = r#"{"input": "mini", "model": {MODEL}, "voice": "alloy"}"#;
const MODERATION_TEMPLATE: &str = r#"{"input": ["smart"], "model": {MODEL}}"#;

const REMOVED_CLIENT_HEADERS: &[&str] = &[
    "authorization",
    "x-api-key",
    "api-key",
    "openai-organization",
];

#[test]
fn requests_are_pointed_at_their_provider() {
    for r in ROUTES.iter().chain(PASSED_ROUTES) {
        let original = r.template.replace("{MODEL}", &quote(r.requested));
        let want_body = r.template.replace("{MODEL}", &quote(r.upstream_model));
        assert_ne!(original, want_body);
        let what = format!("{} {}", r.path, r.requested);

        let (_, host, flow) = post(r.path, original.as_bytes());
        assert_eq!(
            flow,
            Flow::Continue,
            "{what}: {:?}",
            host.sent.first().map(Sent::text)
        );
        assert!(host.sent.is_empty(), "{what}");

        assert_eq!(
            host.req(":authority").as_deref(),
            Some(r.authority),
            "{what}"
        );
        assert_eq!(
            host.req(":path").as_deref(),
            Some(r.upstream_path),
            "{what}"
        );
        assert_eq!(host.req(":method").as_deref(), Some("POST"));
        assert_eq!(
            host.req(CLUSTER_HEADER).as_deref(),
            Some(r.cluster),
            "{what}"
        );
        // Exactly one cluster header: the forged one is gone.
        assert_eq!(
            host.request_headers
                .iter()
                .filter(|(n, _)| n == CLUSTER_HEADER)
                .count(),
            1
        );
        for name in REMOVED_CLIENT_HEADERS {
            let want = r
                .auth
                .filter(|(n, _)| n == name)
                .map(|(_, v)| v.to_string());
            assert_eq!(host.req(name), want, "{what}: header {name}");
        }
        if let Some((name, value)) = r.auth {
            assert_eq!(host.req(name).as_deref(), Some(value), "{what}");
        }
        for (name, value) in r.extra {
            assert_eq!(host.req(name).as_deref(), Some(*value), "{what}");
        }
        // Unrelated client headers survive.
        assert_eq!(host.req("user-agent").as_deref(), Some("test-sdk/1.0"));
        assert_eq!(
            host.req("content-type").as_deref(),
            Some("application/json")
        );

        // Only the model's value changed, byte for byte.
        assert_eq!(
            String::from_utf8(host.request_body.clone()).unwrap(),
            want_body,
            "{what}"
        );
        assert_eq!(host.request_body_replacements, 1, "{what}");
        assert_eq!(
            host.req("content-length"),
            Some(want_body.len().to_string()),
            "{what}"
        );
    }
}

#[test]
fn body_is_untouched_when_the_name_is_the_upstream_model() {
    for (path, template) in [
        ("/v1/chat/completions", CHAT_TEMPLATE),
        ("/v1/embeddings", EMBED_TEMPLATE),
    ] {
        for model in ["gpt-4o-mini", "text-embedding-3-small"] {
            let body = template.replace("{MODEL}", &quote(model));
            let (_, host, flow) = post(path, body.as_bytes());
            assert_eq!(flow, Flow::Continue);
            assert_eq!(host.request_body_replacements, 0, "{path} {model}");
            assert_eq!(host.request_body, body.as_bytes());
            assert_eq!(host.req("content-length"), Some(body.len().to_string()));
            assert_eq!(host.req(CLUSTER_HEADER).as_deref(), Some("openai"));
            assert_eq!(host.req(":path").as_deref(), Some(path));
        }
    }
}

#[test]
fn escaped_model_names_are_decoded_and_rewritten() {
    // "sm\u0061rt" is "smart": routed, and replaced by the upstream literal.
    let original = CHAT_TEMPLATE.replace("{MODEL}", r#""sm\u0061rt""#);
    let (_, host, flow) = post("/v1/chat/completions", original.as_bytes());
    assert_eq!(flow, Flow::Continue, "{:?}", host.sent);
    assert_eq!(
        String::from_utf8(host.request_body.clone()).unwrap(),
        CHAT_TEMPLATE.replace("{MODEL}", "\"gpt-4.1\"")
    );
}

#[test]
fn forged_cluster_header_is_removed_everywhere() {
    // Local answers of every kind.
    for (method, path) in [
        ("GET", "/v1/nothing-here"),
        ("GET", "/v1/models"),
        ("GET", "/v1/chat/completions"),
        ("POST", "/v1/chat/completions"),
    ] {
        let (_, host, _) = bodiless(method, path);
        assert_eq!(host.req(CLUSTER_HEADER), None, "{method} {path}");
        assert_eq!(host.sent.len(), 1);
    }
    // While the body is being read.
    let mut host = client_post("/v1/chat/completions", b"{}");
    let mut f = Filter::new(config(), Role::Standalone);
    assert_eq!(f.on_request_headers(&mut host, false), Flow::Pause);
    assert_eq!(host.req(CLUSTER_HEADER), None);
}

#[test]
fn client_credentials_never_reach_a_keyless_provider() {
    let (_, host) = forwarded("local");
    for name in [
        "authorization",
        "x-api-key",
        "api-key",
        "openai-organization",
    ] {
        assert_eq!(host.req(name), None, "{name}");
    }
    let mut host = MockHost::new("POST", "/v1/chat/completions")
        .with_header("x-goog-api-key", "g")
        .with_header("openai-project", "p")
        .with_body(br#"{"model":"local","messages":[]}"#);
    let mut f = Filter::new(config(), Role::Standalone);
    assert_eq!(f.on_request_headers(&mut host, false), Flow::Pause);
    let len = host.request_body.len();
    assert_eq!(f.on_request_body(&mut host, len, true), Flow::Continue);
    assert_eq!(host.req("x-goog-api-key"), None);
    assert_eq!(host.req("openai-project"), None);
}

// ---------------------------------------------------------------------------
// Host failures
// ---------------------------------------------------------------------------

#[test]
fn failing_header_setters_become_a_500_gateway_error() {
    let cases: &[&[Op]] = &[
        SETTERS,
        &[Op::SetRequestHeader],
        &[Op::RemoveRequestHeader],
        &[Op::ReplaceRequestBody],
    ];
    for ops in cases {
        let body = chat_body("\"smart\"");
        let mut host = client_post("/v1/chat/completions", body.as_bytes());
        let mut f = Filter::new(config(), Role::Standalone);
        assert_eq!(f.on_request_headers(&mut host, false), Flow::Pause);
        host.fail(ops);
        assert_eq!(
            f.on_request_body(&mut host, body.len(), true),
            Flow::Pause,
            "{ops:?}"
        );
        let sent = host.reply();
        assert_eq!(sent.status, 500, "{ops:?}");
        let e = error_fields(&sent.body);
        assert_eq!(e.code.as_deref(), Some("gateway_error"), "{ops:?}");
        assert_eq!(e.kind, "server_error");
        assert!(
            e.message.contains("could not rewrite the request"),
            "{}",
            e.message
        );
        assert!(!e.message.contains(OPENAI_KEY), "{}", e.message);
        assert_eq!(host.request_body, body.as_bytes(), "{ops:?}");
        // The reply is final.
        assert_eq!(
            f.on_request_body(&mut host, body.len(), true),
            Flow::Continue
        );
        assert_eq!(host.sent.len(), 1);
    }
}

#[test]
fn unreadable_request_body_is_a_500_gateway_error() {
    let body = chat_body("\"mini\"");
    let mut host = client_post("/v1/chat/completions", body.as_bytes());
    let mut f = Filter::new(config(), Role::Standalone);
    assert_eq!(f.on_request_headers(&mut host, false), Flow::Pause);
    host.fail(&[Op::RequestBody]);
    assert_eq!(f.on_request_body(&mut host, body.len(), true), Flow::Pause);
    let e = error_fields(&host.reply().body);
    assert_eq!(e.code.as_deref(), Some("gateway_error"));
    assert!(
        e.message.contains("could not read the request body"),
        "{}",
        e.message
    );
    assert_not_routed(&host, "/v1/chat/completions");
}

#[test]
fn a_forged_internal_header_that_cannot_be_removed_fails_closed() {
    // A header the client may not send stays when its removal fails: the
    // request must not go on with it.
    let body = chat_body("\"fast\"");
    let mut host = client_post("/v1/chat/completions", body.as_bytes());
    host.fail(&[Op::RemoveRequestHeader]);
    let mut f = Filter::new(config(), Role::Standalone);
    assert_eq!(f.on_request_headers(&mut host, false), Flow::Pause);
    assert_eq!(host.reply().status, 500);
    let e = error_fields(&host.reply().body);
    assert_eq!(e.code.as_deref(), Some("gateway_error"));
}

#[test]
fn forged_internal_headers_are_removed_with_or_without_a_listing() {
    let cfg = config_from(ROUTED_CONFIG);
    let body = chat_body("\"fast\"");
    for listing_fails in [false, true] {
        let mut host = client_post("/v1/chat/completions", body.as_bytes())
            .with_header("x-meshllm-p1", "attacker")
            .with_header("x-meshllm-p5", "attacker")
            .with_header("x-envoy-max-retries", "5")
            .with_header("x-envoy-upstream-rq-per-try-timeout-ms", "1")
            .with_header("x-meshllm-models", "chain");
        if listing_fails {
            host.fail(&[Op::RequestHeaderNames]);
        }
        let mut router = Filter::new(Rc::clone(&cfg), Role::Router);
        assert_eq!(router.on_request_headers(&mut host, false), Flow::Pause);
        host.failing.clear();
        assert_eq!(
            router.on_request_body(&mut host, body.len(), true),
            Flow::Continue
        );
        assert_ne!(host.req("x-envoy-max-retries").as_deref(), Some("5"));
        for name in ["x-envoy-upstream-rq-per-try-timeout-ms", "x-meshllm-models"] {
            assert_eq!(
                host.req(name),
                None,
                "{name}, listing fails: {listing_fails}"
            );
        }
        // The caller's own fallbacks still count: a chain, handed to Envoy
        // with every position named by the gateway.
        assert_eq!(host.req(CLUSTER_HEADER).as_deref(), Some("meshllm"));
        assert_ne!(host.req("x-meshllm-p1").as_deref(), Some("attacker"));
        // A position beyond max_attempts is only found by a listing.
        if !listing_fails {
            assert_eq!(host.req("x-meshllm-p5"), None);
        }
    }
}

// ---------------------------------------------------------------------------
// Response side
// ---------------------------------------------------------------------------

#[test]
fn successful_response_is_tagged_and_passed_through() {
    let (mut f, mut host) = forwarded("smart");
    let body = br#"{"id":"chatcmpl-1","object":"chat.completion","choices":[]}"#;
    host.respond(
        200,
        &[
            ("content-type", "application/json"),
            ("content-length", &body.len().to_string()),
        ],
        body,
        Some("via_upstream"),
    );
    assert_eq!(f.on_response_headers(&mut host, false), Flow::Continue);
    assert_eq!(
        host.resp(PROVIDER_RESPONSE_HEADER).as_deref(),
        Some("openai")
    );
    assert_eq!(host.resp(MODEL_RESPONSE_HEADER).as_deref(), Some("gpt-4.1"));
    assert_eq!(host.resp("content-length"), Some(body.len().to_string()));
    assert_eq!(
        host.resp("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(f.on_response_body(&mut host, 10, false), Flow::Continue);
    assert_eq!(
        f.on_response_body(&mut host, body.len(), true),
        Flow::Continue
    );
    assert_eq!(host.response_body, body);
    assert_eq!(host.response_body_replacements, 0);
    f.on_done(&mut host);
    let served = requests_metric("openai", "smart", "gpt-4.1", None);
    assert_eq!(
        requests_counted(&host),
        HashMap::from([(served.clone(), 1)])
    );
    // The first target answered: its decision carries the same labels.
    let decision = served.replace("meshllm_requests_total", "meshllm_route_decisions_total")
        + ";route_reason=model";
    assert_eq!(
        host.counters.get(&decision),
        Some(&1),
        "{:?}",
        host.counters
    );
}

#[test]
fn streamed_response_chunks_are_not_buffered() {
    let (mut f, mut host) = forwarded("fast");
    host.respond(
        200,
        &[("content-type", "text/event-stream")],
        b"data: {}\n\n",
        Some("via_upstream"),
    );
    assert_eq!(f.on_response_headers(&mut host, false), Flow::Continue);
    assert_eq!(host.resp(PROVIDER_RESPONSE_HEADER).as_deref(), Some("groq"));
    assert_eq!(
        host.resp(MODEL_RESPONSE_HEADER).as_deref(),
        Some("llama-3.1-8b-instant")
    );
    assert_eq!(
        host.resp("content-type").as_deref(),
        Some("text/event-stream")
    );
    for _ in 0..3 {
        assert_eq!(f.on_response_body(&mut host, 10, false), Flow::Continue);
    }
    assert_eq!(f.on_response_body(&mut host, 10, true), Flow::Continue);
    assert_eq!(host.response_body, b"data: {}\n\n");
}

#[test]
fn metrics_name_the_requested_and_the_served_model() {
    let (mut f, mut host) = forwarded("mini");
    host.respond(200, &[], b"{}", Some("via_upstream"));
    f.on_response_headers(&mut host, false);
    f.on_done(&mut host);
    assert_eq!(
        requests_counted(&host),
        HashMap::from([(requests_metric("openai", "mini", "gpt-4o-mini", None), 1)])
    );
}

#[test]
fn plain_text_upstream_error_is_rewritten_to_openai_shape() {
    let (mut f, mut host) = forwarded("fast");
    let body = b"Internal Server Error: the GPU caught fire";
    host.respond(
        500,
        &[
            ("content-type", "text/plain"),
            ("content-length", &body.len().to_string()),
        ],
        body,
        Some("via_upstream"),
    );
    assert_eq!(f.on_response_headers(&mut host, false), Flow::Pause);
    assert_eq!(host.resp("content-length"), None);
    assert_eq!(
        host.resp("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(host.resp(PROVIDER_RESPONSE_HEADER).as_deref(), Some("groq"));
    // Buffered until complete.
    assert_eq!(f.on_response_body(&mut host, 8, false), Flow::Pause);
    assert_eq!(f.on_response_body(&mut host, 20, false), Flow::Pause);
    assert_eq!(host.response_body, body);
    assert_eq!(
        f.on_response_body(&mut host, body.len(), true),
        Flow::Continue
    );
    assert_eq!(host.response_body_replacements, 1);
    let e = error_fields(&host.response_body);
    assert!(e.message.contains("Provider \"groq\""), "{}", e.message);
    assert!(e.message.contains("GPU caught fire"), "{}", e.message);
    assert!(e.message.contains("(500)"), "{}", e.message);
    assert_eq!(e.kind, "server_error");
    f.on_done(&mut host);
    assert_eq!(
        requests_counted(&host),
        HashMap::from([(
            requests_metric("groq", "fast", "llama-3.1-8b-instant", Some("500")),
            1
        )])
    );
}

#[test]
fn other_json_error_shapes_are_rewritten() {
    let (mut f, mut host) = forwarded("local");
    let body = br#"{"error":"model 'llama3.2' not found, try pulling it first"}"#;
    host.respond(
        404,
        &[("content-type", "application/json")],
        body,
        Some("via_upstream"),
    );
    assert_eq!(f.on_response_headers(&mut host, false), Flow::Pause);
    assert_eq!(
        f.on_response_body(&mut host, body.len(), true),
        Flow::Continue
    );
    let e = error_fields(&host.response_body);
    assert!(e.message.contains("Provider \"ollama\""), "{}", e.message);
    assert!(e.message.contains("try pulling it first"), "{}", e.message);
    assert_eq!(e.kind, "not_found_error");
}

#[test]
fn openai_shaped_upstream_error_is_left_untouched() {
    let (mut f, mut host) = forwarded("smart");
    let body = br#"{"error":{"message":"Rate limit reached for gpt-4.1","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#;
    host.respond(
        429,
        &[
            ("content-type", "application/json"),
            ("content-length", &body.len().to_string()),
        ],
        body,
        Some("via_upstream"),
    );
    assert_eq!(f.on_response_headers(&mut host, false), Flow::Pause);
    assert_eq!(
        f.on_response_body(&mut host, body.len() / 2, false),
        Flow::Pause
    );
    assert_eq!(
        f.on_response_body(&mut host, body.len(), true),
        Flow::Continue
    );
    assert_eq!(host.response_body, body);
    assert_eq!(host.response_body_replacements, 0);
    assert_eq!(
        host.resp("content-type").as_deref(),
        Some("application/json")
    );
    f.on_done(&mut host);
    assert_eq!(
        requests_counted(&host),
        HashMap::from([(
            requests_metric("openai", "smart", "gpt-4.1", Some("429")),
            1
        )])
    );
}

#[test]
fn provider_key_in_an_error_reply_is_redacted() {
    for (model, key, body) in [
        (
            "smart",
            OPENAI_KEY,
            format!(
                r#"{{"error":{{"message":"Incorrect API key provided: {OPENAI_KEY}.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}}}"#
            ),
        ),
        (
            "azure-gpt-4o",
            AZURE_KEY,
            format!("bad key {AZURE_KEY} for deployment"),
        ),
        (
            "fast",
            GROQ_KEY,
            format!(r#"{{"detail":"Bearer {GROQ_KEY} rejected"}}"#),
        ),
    ] {
        let (mut f, mut host) = forwarded(model);
        host.respond(
            401,
            &[("content-type", "application/json")],
            body.as_bytes(),
            Some("via_upstream"),
        );
        assert_eq!(f.on_response_headers(&mut host, false), Flow::Pause);
        assert_eq!(
            f.on_response_body(&mut host, body.len(), true),
            Flow::Continue
        );
        let text = String::from_utf8(host.response_body.clone()).unwrap();
        assert!(!text.contains(key), "{model}: {text}");
        assert!(text.contains("[redacted]"), "{model}: {text}");
        let e = error_fields(&host.response_body);
        assert!(e.message.contains("(401)"), "{}", e.message);
    }
}

#[test]
fn envoy_connection_failure_is_provider_unavailable() {
    let (mut f, mut host) = forwarded("smart");
    let body = b"upstream connect error or disconnect/reset before headers. reset reason: connection failure";
    host.respond(
        503,
        &[
            ("content-type", "text/plain"),
            ("content-length", &body.len().to_string()),
        ],
        body,
        Some("upstream_reset_before_response_started{connection_failure}"),
    );
    assert_eq!(f.on_response_headers(&mut host, false), Flow::Pause);
    assert_eq!(host.resp("content-length"), None);
    assert_eq!(
        host.resp("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(
        f.on_response_body(&mut host, body.len(), false),
        Flow::Pause
    );
    assert_eq!(
        f.on_response_body(&mut host, body.len(), true),
        Flow::Continue
    );
    let e = error_fields(&host.response_body);
    assert_eq!(e.code.as_deref(), Some("provider_unavailable"));
    assert_eq!(e.kind, "server_error");
    assert!(
        e.message
            .contains("Provider \"openai\" could not be reached"),
        "{}",
        e.message
    );
    assert!(e.message.contains("connection failure"), "{}", e.message);
}

#[test]
fn envoy_timeout_is_provider_timeout() {
    let (mut f, mut host) = forwarded("mini");
    let body = b"upstream request timeout";
    host.respond(
        504,
        &[("content-type", "text/plain")],
        body,
        Some("upstream_response_timeout"),
    );
    assert_eq!(f.on_response_headers(&mut host, false), Flow::Pause);
    assert_eq!(
        f.on_response_body(&mut host, body.len(), true),
        Flow::Continue
    );
    let e = error_fields(&host.response_body);
    assert_eq!(e.code.as_deref(), Some("provider_timeout"));
    assert!(
        e.message.contains("did not answer in time"),
        "{}",
        e.message
    );
}

#[test]
fn openai_shaped_body_from_envoy_is_still_rewritten() {
    // An OpenAI-shaped body is only trusted when the provider sent it.
    let (mut f, mut host) = forwarded("mini");
    let body = br#"{"error":{"message":"overflow","type":"x","param":null,"code":null}}"#;
    host.respond(
        503,
        &[],
        body,
        Some("upstream_reset_before_response_started{overflow}"),
    );
    f.on_response_headers(&mut host, false);
    assert_eq!(
        f.on_response_body(&mut host, body.len(), true),
        Flow::Continue
    );
    assert_eq!(host.response_body_replacements, 1);
    assert_eq!(
        error_fields(&host.response_body).code.as_deref(),
        Some("provider_unavailable")
    );
}

#[test]
fn missing_code_details_count_as_the_provider() {
    let (mut f, mut host) = forwarded("mini");
    let body = br#"{"error":{"message":"nope","type":"x","param":null,"code":null}}"#;
    host.respond(400, &[], body, None);
    f.on_response_headers(&mut host, false);
    assert_eq!(
        f.on_response_body(&mut host, body.len(), true),
        Flow::Continue
    );
    assert_eq!(host.response_body, body);
}

#[test]
fn error_headers_only_response_is_answered_in_callers_shape() {
    // No body will follow, so the filter's own reply takes its place, with
    // the headers a caller needs (retry-after, who answered).
    let (mut f, mut host) = forwarded("mini");
    host.respond(
        429,
        &[("content-length", "0"), ("retry-after", "7")],
        b"",
        Some("via_upstream"),
    );
    assert_eq!(f.on_response_headers(&mut host, true), Flow::Pause);
    assert_eq!(host.sent.len(), 1);
    let sent = &host.sent[0];
    assert_eq!(sent.status, 429);
    let v: Value = serde_json::from_slice(&sent.body).unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert_eq!(
        v["error"]["message"],
        "Provider \"openai\" returned an error (429): no details given"
    );
    assert_eq!(sent.header("retry-after"), Some("7"));
    assert_eq!(sent.header(PROVIDER_RESPONSE_HEADER), Some("openai"));
    assert_eq!(sent.header("content-type"), Some("application/json"));
    f.on_done(&mut host);
    assert_eq!(
        requests_counted(&host),
        HashMap::from([(
            requests_metric("openai", "mini", "gpt-4o-mini", Some("429")),
            1
        )])
    );
}

#[test]
fn failing_response_host_calls_do_not_break_the_response() {
    // Unreadable error body: passed on as it is.
    let (mut f, mut host) = forwarded("mini");
    host.respond(500, &[], b"oops", Some("via_upstream"));
    assert_eq!(f.on_response_headers(&mut host, false), Flow::Pause);
    host.fail(&[Op::ResponseBody]);
    assert_eq!(f.on_response_body(&mut host, 4, true), Flow::Continue);
    assert_eq!(host.response_body, b"oops");
    // Setters refused: still Continue, nothing panics.
    let (mut f, mut host) = forwarded("mini");
    host.respond(
        500,
        &[("content-length", "4")],
        b"oops",
        Some("via_upstream"),
    );
    host.fail(SETTERS);
    assert_eq!(f.on_response_headers(&mut host, false), Flow::Pause);
    assert_eq!(f.on_response_body(&mut host, 4, true), Flow::Continue);
    assert_eq!(host.response_body, b"oops");
    assert_eq!(host.resp("content-length").as_deref(), Some("4"));
}

#[test]
fn local_replies_are_not_touched_on_the_way_out() {
    // A 200 (models list) and a 404 (unknown model) answered by the filter.
    for path in ["/v1/models", "/v1/models/nope"] {
        let (mut f, mut host, _) = bodiless("GET", path);
        let sent = host.reply().clone();
        let len = sent.body.len().to_string();
        host.respond(
            sent.status,
            &[
                ("content-type", "application/json"),
                ("content-length", &len),
            ],
            &sent.body,
            Some("wasm_local_reply"),
        );
        let before = host.response_headers.clone();
        assert_eq!(
            f.on_response_headers(&mut host, false),
            Flow::Continue,
            "{path}"
        );
        assert_eq!(host.response_headers, before, "{path}");
        assert_eq!(f.on_response_body(&mut host, 3, false), Flow::Continue);
        assert_eq!(
            f.on_response_body(&mut host, sent.body.len(), true),
            Flow::Continue
        );
        assert_eq!(host.response_body, sent.body);
        assert_eq!(host.response_body_replacements, 0);
        // Status for the metrics is the local reply's, not re-read.
        host.response_headers = vec![(":status".into(), "502".into())];
        f.on_done(&mut host);
        // Listings and unknown URLs are not LLM calls: no metrics.
        assert_eq!(host.counters, HashMap::new(), "{path}");
    }
}

// ---------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------

#[test]
fn on_done_counts_exactly_one_request() {
    // Routed and answered 200.
    let (mut f, mut host) = forwarded("gpt-4o-mini");
    host.respond(200, &[], b"{}", Some("via_upstream"));
    f.on_response_headers(&mut host, false);
    f.on_done(&mut host);
    assert_eq!(
        requests_counted(&host),
        HashMap::from([(
            requests_metric("openai", "gpt-4o-mini", "gpt-4o-mini", None),
            1
        )])
    );
    // Unknown URL: not an LLM call, not counted.
    let (mut f, mut host, _) = bodiless("GET", "/nope");
    f.on_done(&mut host);
    assert_eq!(requests_counted(&host), HashMap::new());
    // Unknown model in the body: 404, no labels from the client's input.
    let (mut f, mut host, _) = post(
        "/v1/chat/completions",
        br#"{"model":"evil;provider=x","messages":[]}"#,
    );
    f.on_done(&mut host);
    assert_eq!(
        requests_counted(&host),
        HashMap::from([(requests_metric("none", "_OTHER", "none", Some("404")), 1)])
    );
    // Forwarded but abandoned before any response: no status.
    let (mut f, mut host) = forwarded("fast");
    f.on_done(&mut host);
    assert_eq!(
        requests_counted(&host),
        HashMap::from([(
            requests_metric("groq", "fast", "llama-3.1-8b-instant", Some("_OTHER")),
            1
        )])
    );
}

// ---------------------------------------------------------------------------
// Suspected bugs in the pipeline (ignored until fixed; see the reasons)
// ---------------------------------------------------------------------------

const SLASHED_CONFIG: &str = r#"{
  "providers": [{"name": "together", "kind": "openai_compatible",
                 "base_url": "https://api.together.xyz/v1", "api_key_env": "OPENAI_API_KEY"}],
  "models": [{"name": "meta-llama/Llama-3.3-70B", "provider": "together"}]
}"#;

#[test]
fn model_ids_with_a_slash_are_found_unencoded() {
    let cfg = config_from(SLASHED_CONFIG);
    let mut host = MockHost::new("GET", "/v1/models/meta-llama/Llama-3.3-70B");
    let mut f = Filter::new(Rc::clone(&cfg), Role::Standalone);
    assert_eq!(f.on_request_headers(&mut host, true), Flow::Pause);
    let sent = host.reply();
    assert_eq!(sent.status, 200, "{}", sent.text());
    assert_eq!(
        Some(sent.body.as_slice()),
        cfg.model_body("meta-llama/Llama-3.3-70B")
    );
}

#[test]
fn percent_encoded_model_ids_are_found() {
    let cfg = config_from(SLASHED_CONFIG);
    for path in [
        "/v1/models/meta-llama%2FLlama-3.3-70B",
        "/v1/models/meta-llama%2fLlama-3.3-70B",
    ] {
        let mut host = MockHost::new("GET", path);
        let mut f = Filter::new(Rc::clone(&cfg), Role::Standalone);
        assert_eq!(f.on_request_headers(&mut host, true), Flow::Pause);
        let sent = host.reply();
        assert_eq!(sent.status, 200, "{path}: {}", sent.text());
        assert_eq!(
            Some(sent.body.as_slice()),
            cfg.model_body("meta-llama/Llama-3.3-70B")
        );
    }
}

#[test]
fn rewritten_error_reply_drops_content_encoding() {
    let (mut f, mut host) = forwarded("smart");
    // A gzip stream (magic bytes, deflate, flags...) the provider chose to send.
    let body: &[u8] = &[
        0x1f, 0x8b, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03, 0xf3, 0x48, 0xcd,
    ];
    host.respond(
        502,
        &[
            ("content-type", "text/html"),
            ("content-encoding", "gzip"),
            ("content-length", &body.len().to_string()),
        ],
        body,
        Some("via_upstream"),
    );
    assert_eq!(f.on_response_headers(&mut host, false), Flow::Pause);
    assert_eq!(
        f.on_response_body(&mut host, body.len(), true),
        Flow::Continue
    );
    // The filter did replace the body with plain (identity-encoded) JSON...
    assert_eq!(host.response_body_replacements, 1);
    assert!(serde_json::from_slice::<Value>(&host.response_body).is_ok());
    // ...so the reply must not still claim to be gzip.
    assert_eq!(host.resp("content-encoding"), None);
}

/// Envoy answers 413 itself when the body outgrows its own buffer limit
/// (per_connection_buffer_limit_bytes, 1 MiB by default) before the filter's
/// `max_request_bytes` is reached; no provider has been chosen yet.
fn envoy_413_while_reading_body() -> (Filter, MockHost) {
    let mut host = client_post("/v1/chat/completions", b"{");
    let mut f = Filter::new(config(), Role::Standalone);
    assert_eq!(f.on_request_headers(&mut host, false), Flow::Pause);
    assert_eq!(f.on_request_body(&mut host, 1, false), Flow::Pause);
    let body = b"Payload Too Large";
    host.respond(
        413,
        &[("content-type", "text/plain")],
        body,
        Some("request_payload_too_large"),
    );
    assert_eq!(f.on_response_headers(&mut host, false), Flow::Pause);
    assert_eq!(
        f.on_response_body(&mut host, body.len(), true),
        Flow::Continue
    );
    (f, host)
}

#[test]
fn envoy_reply_before_routing_is_openai_shaped() {
    let (mut f, mut host) = envoy_413_while_reading_body();
    assert_eq!(
        host.resp("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(host.resp(PROVIDER_RESPONSE_HEADER), None);
    let e = error_fields(&host.response_body);
    assert_eq!(e.code.as_deref(), Some("request_too_large"));
    assert_eq!(e.kind, "invalid_request_error");
    f.on_done(&mut host);
    assert_eq!(
        requests_counted(&host),
        HashMap::from([(requests_metric("none", "none", "none", Some("413")), 1)])
    );
}

#[test]
fn envoy_reply_before_routing_does_not_blame_a_provider() {
    let (_, host) = envoy_413_while_reading_body();
    let e = error_fields(&host.response_body);
    assert!(!e.message.contains("Provider \"none\""), "{}", e.message);
    assert!(!e.message.contains("could not be reached"), "{}", e.message);
}

// --- other callers and provider kinds ------------------------------------------

const MULTI_CONFIG: &str = r#"{
  "providers": [
    {"name": "openai", "kind": "openai", "api_key_env": "OPENAI_API_KEY"},
    {"name": "bedrock", "kind": "bedrock", "region": "eu-west-1"},
    {"name": "gemini", "kind": "gemini", "api_key_env": "GEMINI_API_KEY"}
  ],
  "models": [
    {"name": "gpt", "provider": "openai", "model": "gpt-4.1"},
    {"name": "nova", "provider": "bedrock", "model": "amazon.nova-pro-v1:0"},
    {"name": "flash", "provider": "gemini", "model": "gemini-2.5-flash"}
  ]
}"#;

fn multi_post(path: &str, body: &[u8]) -> (Filter, MockHost, Flow) {
    let config = testing::config(MULTI_CONFIG);
    let mut host = client_post(path, body)
        .with_header("x-goog-api-key", "client-goog")
        .with_header("anthropic-version", "2023-06-01");
    let mut f = Filter::new(Rc::new(config), Role::Standalone);
    if f.on_request_headers(&mut host, false) == Flow::Continue {
        return (f, host, Flow::Continue);
    }
    if !host.sent.is_empty() {
        return (f, host, Flow::Pause);
    }
    let flow = f.on_request_body(&mut host, body.len(), true);
    (f, host, flow)
}

#[test]
fn anthropic_callers_get_anthropic_shaped_errors() {
    let (_, host, flow) = multi_post("/v1/messages", br#"{"model":"gpt","max_tokens":5}"#);
    assert_eq!(flow, Flow::Pause);
    let sent = host.reply();
    assert_eq!(sent.status, 400);
    let v = sent.json();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(v["error"]["message"].as_str().unwrap().contains("messages"));
}

#[test]
fn gemini_callers_get_gemini_shaped_errors() {
    let body = br#"{"contents":[{"role":"user","parts":[{"text":"hi"}]}]}"#;
    let (_, host, _) = multi_post("/v1beta/models/nope:generateContent", body);
    let sent = host.reply();
    assert_eq!(sent.status, 404);
    assert_eq!(sent.json()["error"]["status"], "NOT_FOUND");
    assert_eq!(sent.json()["error"]["code"], 404);

    // Streaming needs alt=sse: Google's JSON-array form is not served.
    let (_, host, _) = multi_post("/v1beta/models/flash:streamGenerateContent", body);
    let sent = host.reply();
    assert_eq!(sent.status, 400);
    assert_eq!(sent.json()["error"]["status"], "INVALID_ARGUMENT");
    assert!(sent.text().contains("alt=sse"));
}

#[test]
fn gemini_to_gemini_keeps_the_body_and_swaps_credentials() {
    let body = br#"{"contents":[{"role":"user","parts":[{"text":"hi"}]}]}"#;
    let (_, host, flow) = multi_post("/v1/models/flash:streamGenerateContent?alt=sse", body);
    assert_eq!(flow, Flow::Continue, "{:?}", host.sent);
    assert_eq!(
        host.req(":path").as_deref(),
        Some("/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse")
    );
    assert_eq!(host.req("x-goog-api-key").as_deref(), Some(GEMINI_KEY));
    assert_eq!(host.req("authorization"), None);
    assert_eq!(host.req("anthropic-version"), None);
    assert_eq!(host.request_body, body);
}

#[test]
fn bedrock_requests_are_translated_and_signed() {
    let body = br#"{"model":"nova","messages":[{"role":"user","content":"hi"}],"stream":true}"#;
    let (_, host, flow) = multi_post("/v1/chat/completions", body);
    assert_eq!(flow, Flow::Continue, "{:?}", host.sent);
    assert_eq!(
        host.req(":path").as_deref(),
        Some("/model/amazon.nova-pro-v1%3A0/converse-stream")
    );
    assert_eq!(
        host.req(":authority").as_deref(),
        Some("bedrock-runtime.eu-west-1.amazonaws.com")
    );
    let auth = host.req("authorization").unwrap();
    assert!(
        auth.starts_with(&format!("AWS4-HMAC-SHA256 Credential={AWS_ACCESS_KEY_ID}/")),
        "{auth}"
    );
    assert!(auth.contains("/eu-west-1/bedrock/aws4_request"), "{auth}");
    assert!(host.req("x-amz-date").is_some());
    let sent: Value = serde_json::from_slice(&host.request_body).unwrap();
    assert_eq!(sent["messages"][0]["content"][0]["text"], "hi");
    assert_eq!(
        host.req("x-amz-content-sha256").unwrap(),
        crate::core::sha256::hex(&crate::core::sha256::sha256(&host.request_body))
    );
    assert_eq!(
        host.req("content-length").unwrap(),
        host.request_body.len().to_string()
    );
    assert!(!host.request_body.windows(6).any(|w| w == b"client"));
}

// ---------------------------------------------------------------------------
// The two halves: the listener half plans, the upstream half runs an attempt.

const ROUTED_CONFIG: &str = r#"{
  "providers": [
    {"name": "azure", "kind": "azure_openai", "base_url": "https://res.openai.azure.com",
     "api_version": "2024-10-21", "api_key_env": "AZURE_KEY"},
    {"name": "groq", "kind": "openai_compatible", "base_url": "https://api.groq.com/openai/v1",
     "api_key_env": "GROQ_API_KEY", "headers": {"X-Title": "meshllm"}},
    {"name": "nokey", "kind": "openai_compatible", "base_url": "https://nokey.example/v1",
     "api_key_env": "NOKEY_API_KEY"}
  ],
  "models": [
    {"name": "azure-gpt-4o", "provider": "azure", "model": "gpt-4o", "deployment": "gpt4o-prod"},
    {"name": "fast", "provider": "groq", "model": "llama-3.1-8b-instant"},
    {"name": "broken", "provider": "nokey"}
  ],
  "routes": [{"name": "chain", "targets": ["broken", "azure-gpt-4o", "fast"]}]
}"#;

const POSITION_PROPERTY: &str = "xds.upstream_host_metadata.filter_metadata.meshllm.position";

#[test]
fn router_half_plans_the_chain_and_the_attempt_half_serves_its_position() {
    let cfg = config_from(ROUTED_CONFIG);
    let body = chat_body(&quote("chain"));
    let mut host = client_post("/v1/chat/completions", body.as_bytes());
    let mut router = Filter::new(Rc::clone(&cfg), Role::Router);
    assert_eq!(router.on_request_headers(&mut host, false), Flow::Pause);
    assert_eq!(
        router.on_request_body(&mut host, body.len(), true),
        Flow::Continue
    );
    // The target without a key is dropped; the rest keep their order.
    assert_eq!(host.req("x-meshllm-p0").as_deref(), Some("azure"));
    assert_eq!(host.req("x-meshllm-p1").as_deref(), Some("groq"));
    assert_eq!(host.req("x-meshllm-p2").as_deref(), Some("-"));
    assert_eq!(host.req("x-envoy-max-retries").as_deref(), Some("1"));
    assert_eq!(host.req(CLUSTER_HEADER).as_deref(), Some(FAILOVER_CLUSTER));
    assert_eq!(host.req("authorization"), None);
    assert_eq!(host.req("x-api-key"), None);
    assert_eq!(
        host.request_body,
        body.as_bytes(),
        "the listener half leaves the body"
    );
    assert!(host.properties.contains_key(PLAN_PROPERTY));

    // Attempt 2 lands on position 1 with what attempt 1 left in the headers.
    let mut up = MockHost::new("POST", "/openai/deployments/gpt4o-prod/chat/completions")
        .with_body(body.as_bytes());
    up.request_headers = host.request_headers.clone();
    up.properties = host.properties.clone();
    up.properties
        .insert(POSITION_PROPERTY.into(), b"1".to_vec());
    set_header(&mut up.request_headers, "api-key", AZURE_KEY);
    set_header(&mut up.request_headers, "x-envoy-attempt-count", "2");
    let mut attempt = Filter::new(Rc::clone(&cfg), Role::Attempt);
    assert_eq!(attempt.on_request_headers(&mut up, false), Flow::Pause);
    assert_eq!(
        attempt.on_request_body(&mut up, body.len(), true),
        Flow::Continue
    );
    assert_eq!(up.req("api-key"), None, "attempt 1's Azure key is gone");
    assert_eq!(up.req("authorization"), Some(format!("Bearer {GROQ_KEY}")));
    assert_eq!(up.req(":authority").as_deref(), Some("api.groq.com"));
    assert_eq!(
        up.req(":path").as_deref(),
        Some("/openai/v1/chat/completions")
    );
    assert_eq!(up.req("x-title").as_deref(), Some("meshllm"));
    assert_eq!(up.req("x-envoy-attempt-count"), None);
    let sent: Value = serde_json::from_slice(&up.request_body).unwrap();
    assert_eq!(sent["model"], "llama-3.1-8b-instant");

    set_header(&mut up.response_headers, ":status", "200");
    assert_eq!(attempt.on_response_headers(&mut up, false), Flow::Continue);
    assert_eq!(up.resp("x-meshllm-attempts").as_deref(), Some("2"));
    assert_eq!(up.resp("x-meshllm-route").as_deref(), Some("ordered"));
    assert_eq!(up.resp(PROVIDER_RESPONSE_HEADER).as_deref(), Some("groq"));
    let health = crate::routing::health::snapshot(
        &up,
        "fast",
        up.now_unix_millis(),
        &HealthPolicy::default(),
    );
    assert_eq!((health.requests, health.samples), (1, 1));
}

#[test]
fn a_single_target_is_served_by_the_listener_half_and_feeds_health() {
    let cfg = config_from(ROUTED_CONFIG);
    let body = chat_body(&quote("fast"));
    // Answered with a provider's 503: a failure of the target. Abandoned
    // before any answer: the caller went away (Envoy answers every request
    // it forwarded), which says nothing about the target.
    for answered in [true, false] {
        let mut host = client_post("/v1/chat/completions", body.as_bytes())
            .with_header("authorization", "Bearer client-secret");
        let mut router = Filter::new(Rc::clone(&cfg), Role::Router);
        assert_eq!(router.on_request_headers(&mut host, false), Flow::Pause);
        assert_eq!(
            router.on_request_body(&mut host, body.len(), true),
            Flow::Continue
        );
        assert_eq!(host.req(CLUSTER_HEADER).as_deref(), Some("meshllm.p0"));
        assert_eq!(host.req("x-meshllm-p0").as_deref(), Some("groq"));
        assert!(!host.properties.contains_key(PLAN_PROPERTY));
        assert_eq!(host.req(":authority").as_deref(), Some("api.groq.com"));
        assert_eq!(
            host.req("authorization"),
            Some(format!("Bearer {GROQ_KEY}"))
        );
        let sent: Value = serde_json::from_slice(&host.request_body).unwrap();
        assert_eq!(sent["model"], "llama-3.1-8b-instant");
        if answered {
            set_header(&mut host.response_headers, ":status", "503");
            router.on_response_headers(&mut host, false);
            assert_eq!(host.resp("x-meshllm-attempts").as_deref(), Some("1"));
            assert!(host.resp("x-meshllm-route").is_some());
        }
        router.on_done(&mut host);
        let health = crate::routing::health::snapshot(
            &host,
            "fast",
            host.now_unix_millis(),
            &HealthPolicy::default(),
        );
        let expected = if answered { (1, 1) } else { (0, 0) };
        assert_eq!(
            (health.requests, health.failures),
            expected,
            "answered: {answered}"
        );
    }
}

#[test]
fn credentials_are_stripped_whether_or_not_headers_can_be_listed() {
    let cfg = config_from(ROUTED_CONFIG);
    let body = chat_body(&quote("chain"));
    for listing_fails in [false, true] {
        let mut host = client_post("/v1/chat/completions", body.as_bytes())
            .with_header("anthropic-version", "2023-06-01");
        if listing_fails {
            host.fail(&[Op::RequestHeaderNames]);
        }
        let mut router = Filter::new(Rc::clone(&cfg), Role::Router);
        router.on_request_headers(&mut host, false);
        router.on_request_body(&mut host, body.len(), true);
        for name in CLIENT_CREDENTIAL_HEADERS.iter().chain(ANTHROPIC_HEADERS) {
            assert_eq!(
                host.req(name),
                None,
                "{name}, listing fails: {listing_fails}"
            );
        }
        let plan = handoff::plan(&host).unwrap();
        assert_eq!(
            plan.anthropic,
            [("anthropic-version".to_string(), "2023-06-01".to_string())]
        );

        // An attempt after one at Azure: its key and the client's are gone.
        let mut up = MockHost::new("POST", "/").with_body(body.as_bytes());
        up.request_headers = host.request_headers.clone();
        up.properties = host.properties.clone();
        up.properties
            .insert(POSITION_PROPERTY.into(), b"1".to_vec());
        set_header(&mut up.request_headers, "api-key", AZURE_KEY);
        set_header(&mut up.request_headers, "x-goog-api-key", "client-goog");
        if listing_fails {
            up.fail(&[Op::RequestHeaderNames]);
        }
        let mut attempt = Filter::new(Rc::clone(&cfg), Role::Attempt);
        attempt.on_request_headers(&mut up, false);
        assert_eq!(
            attempt.on_request_body(&mut up, body.len(), true),
            Flow::Continue
        );
        assert_eq!(up.req("api-key"), None);
        assert_eq!(up.req("x-goog-api-key"), None);
        assert_eq!(up.req("anthropic-version"), None);
        assert_eq!(up.req("authorization"), Some(format!("Bearer {GROQ_KEY}")));
    }
}

#[test]
fn attempt_half_without_a_plan_or_position_fails_loudly() {
    let cfg = config_from(ROUTED_CONFIG);
    let mut up = MockHost::new("POST", "/v1/chat/completions");
    let mut attempt = Filter::new(Rc::clone(&cfg), Role::Attempt);
    assert_eq!(attempt.on_request_headers(&mut up, false), Flow::Pause);
    let sent = &up.sent[0];
    assert_eq!(sent.status, 500);
    assert!(String::from_utf8_lossy(&sent.body).contains("no routing plan"));
}

#[test]
fn attempt_half_refuses_a_garbled_plan() {
    // As it refuses a missing one (the encoding's own tests: handoff.rs).
    let cfg = config_from(ROUTED_CONFIG);
    let mut up = MockHost::new("POST", "/v1/chat/completions");
    up.properties
        .insert(PLAN_PROPERTY.into(), b"\xff\xff garbage".to_vec());
    let mut attempt = Filter::new(Rc::clone(&cfg), Role::Attempt);
    assert_eq!(attempt.on_request_headers(&mut up, false), Flow::Pause);
    assert_eq!(up.sent[0].status, 500);
    assert!(String::from_utf8_lossy(&up.sent[0].body).contains("no routing plan"));
}

#[test]
fn attempt_half_refuses_a_plan_naming_models_it_lacks() {
    // Found by the fuzzer (`fuzz_tests.rs`): a mutated plan indexed past
    // the configuration's models and panicked.
    let cfg = config_from(ROUTED_CONFIG);
    for (chain, position) in [(vec![117], "0"), (vec![117, 1], "1"), (vec![0, 117], "0")] {
        let mut up = MockHost::new("POST", "/v1/chat/completions");
        let plan = handoff::Plan {
            caller: crate::core::schema::Schema::OpenAi,
            operation: crate::config::models::Operation::ChatCompletions,
            gemini: None,
            chain: chain.clone(),
            reason: "ordered".into(),
            anthropic: Vec::new(),
            labels: ("ns".into(), "svc".into(), "chain".into()),
        };
        handoff::leave_plan(&mut up, &plan).unwrap();
        up.properties
            .insert(POSITION_PROPERTY.into(), position.as_bytes().to_vec());
        let mut attempt = Filter::new(Rc::clone(&cfg), Role::Attempt);
        assert_eq!(attempt.on_request_headers(&mut up, false), Flow::Pause);
        let sent = up.reply();
        assert_eq!(sent.status, 500, "{chain:?}");
        assert!(sent.text().contains("no routing plan"), "{chain:?}");
    }
}

// ---------------------------------------------------------------------------
// Quotas: admission in the listener half, usage from the upstream half.

fn quota_config() -> Rc<Config> {
    let mut doc: Value = serde_json::from_str(ROUTED_CONFIG).unwrap();
    doc["identity"] = serde_json::json!({"source": "trusted_header", "header": "x-caller"});
    doc["quotas"] = serde_json::json!({"limits": [
        {"name": "team", "match": {"namespace": "team"}, "tokens_per_day": 100000, "requests_per_day": 2}
    ]});
    config_from(&doc.to_string())
}

const TEAM_BUCKET: &str = "meshllm/quota/v1/team";

fn team_standings(host: &MockHost) -> Vec<crate::quota::buckets::Standing> {
    let cfg = quota_config();
    let rule = &cfg.quotas.as_ref().unwrap().rules[0];
    crate::quota::buckets::standings(host, TEAM_BUCKET, &rule.limits, host.now_unix_millis())
}

#[test]
fn the_listener_half_reserves_and_settles_with_the_attempts_usage() {
    let cfg = quota_config();
    let body = chat_body(&quote("chain"));
    let mut host =
        client_post("/v1/chat/completions", body.as_bytes()).with_header("x-caller", "team/api");
    let mut router = Filter::new(Rc::clone(&cfg), Role::Router);
    assert_eq!(router.on_request_headers(&mut host, false), Flow::Pause);
    assert_eq!(
        router.on_request_body(&mut host, body.len(), true),
        Flow::Continue
    );
    assert_eq!(
        host.req("x-caller"),
        None,
        "the identity header stays in the gateway"
    );
    let reserved = team_standings(&host);
    let tokens = reserved
        .iter()
        .find(|s| s.limit.meter == crate::quota::buckets::Meter::Tokens)
        .unwrap();
    assert!(tokens.used > 0);

    // The upstream half leaves the served target and its usage behind.
    let fast = cfg.route_index("fast").unwrap();
    host.properties.insert(
        USAGE_PROPERTY.into(),
        format!("{fast},30,12,0,0").into_bytes(),
    );
    host.respond(
        200,
        &[
            (ATTEMPTS_RESPONSE_HEADER, "2"),
            (PROVIDER_RESPONSE_HEADER, "groq"),
            (MODEL_RESPONSE_HEADER, "llama-3.1-8b-instant"),
            ("x-ratelimit-remaining-tokens", "999999"),
        ],
        b"{}",
        None,
    );
    // A complete answer of a chain is held until its end: the upstream half
    // may still give it another status.
    assert_eq!(router.on_response_headers(&mut host, false), Flow::Pause);
    assert_eq!(
        host.resp("x-ratelimit-limit-tokens").as_deref(),
        Some("100000")
    );
    assert_eq!(
        host.resp("x-ratelimit-remaining-tokens"),
        Some((100_000 - tokens.used).to_string()),
        "the caller's own limit replaces the provider's"
    );
    assert_eq!(router.on_response_body(&mut host, 2, true), Flow::Continue);
    let settled = team_standings(&host);
    let used: Vec<(crate::quota::buckets::Meter, u64)> =
        settled.iter().map(|s| (s.limit.meter, s.used)).collect();
    assert!(
        used.contains(&(crate::quota::buckets::Meter::Tokens, 42)),
        "{used:?}"
    );
    assert!(
        used.contains(&(crate::quota::buckets::Meter::Requests, 1)),
        "{used:?}"
    );
    assert_eq!(
        host.properties.get("meshllm.caller").map(Vec::as_slice),
        Some(&b"team/api"[..])
    );
    let field = |name: &str| {
        host.properties
            .get(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    for (name, want) in [
        ("meshllm.input_tokens", Some("30")),
        ("meshllm.output_tokens", Some("12")),
        ("meshllm.cached_tokens", Some("0")),
        ("meshllm.tokens_estimated", None),
        ("meshllm.request_model", Some("chain")),
        ("meshllm.provider", Some("groq")),
        ("meshllm.response_model", Some("llama-3.1-8b-instant")),
        ("meshllm.attempts", Some("2")),
        ("meshllm.route_reason", Some("ordered")),
        ("meshllm.ttft_ms", None),
    ] {
        assert_eq!(field(name).as_deref(), want, "{name}");
    }
    assert_eq!(
        host.properties.get("meshllm.quota").map(Vec::as_slice),
        Some(&b"admitted"[..])
    );
    // GenAI metrics name the caller, the model asked for and the one served.
    let labels = "caller_namespace=team;caller_service=api;gen_ai_operation_name=chat;\
                  gen_ai_provider_name=groq;gen_ai_request_model=chain;\
                  gen_ai_response_model=llama-3.1-8b-instant";
    let histogram = |name: String| host.histograms.get(&name).cloned().unwrap_or_default();
    assert_eq!(
        histogram(format!(
            "gen_ai.client.token.usage;{labels};gen_ai_token_type=input"
        )),
        [30]
    );
    assert_eq!(
        histogram(format!(
            "gen_ai.client.token.usage;{labels};gen_ai_token_type=output"
        )),
        [12]
    );
    assert_eq!(
        histogram(format!(
            "gen_ai.client.token.usage;{labels};gen_ai_token_type=cached"
        )),
        [] as [u64; 0],
        "token types that did not happen are not recorded"
    );
    assert_eq!(
        histogram(format!("gen_ai.server.request.duration;{labels}")).len(),
        1
    );
    assert!(
        !host
            .histograms
            .keys()
            .any(|k| k.contains("time_to_first_token")),
        "no first-token time for an answer that was not streamed"
    );
    assert_eq!(
        host.counters
            .get(&format!("meshllm_requests_total;{labels}")),
        Some(&1)
    );
    assert_eq!(
        host.counters.get(&format!(
            "meshllm_tokens_total;{labels};gen_ai_token_type=output"
        )),
        Some(&12)
    );
    let decisions: Vec<&String> = host
        .counters
        .keys()
        .filter(|k| k.starts_with("meshllm_route_decisions_total;caller_namespace=team;"))
        .collect();
    // The decision names the first target, not the fallback that answered.
    assert_eq!(
        decisions,
        [
            "meshllm_route_decisions_total;caller_namespace=team;caller_service=api;\
          gen_ai_operation_name=chat;gen_ai_provider_name=azure;\
          gen_ai_request_model=chain;gen_ai_response_model=gpt-4o;route_reason=ordered"
        ]
    );
    // Settling happens once, even though the request's log comes later.
    let counters = host.counters.clone();
    router.on_done(&mut host);
    assert_eq!(team_standings(&host), settled);
    assert_eq!(host.counters, counters, "counted once");
}

#[test]
fn provider_rate_limits_are_dropped_whether_or_not_headers_can_be_listed() {
    let cfg = quota_config();
    let body = chat_body(&quote("chain"));
    for listing_fails in [false, true] {
        let mut host = client_post("/v1/chat/completions", body.as_bytes())
            .with_header("x-caller", "team/api");
        let mut router = Filter::new(Rc::clone(&cfg), Role::Router);
        router.on_request_headers(&mut host, false);
        assert_eq!(
            router.on_request_body(&mut host, body.len(), true),
            Flow::Continue
        );
        host.respond(
            200,
            &[
                ("x-ratelimit-remaining-requests", "5"),
                ("anthropic-ratelimit-tokens-reset", "2025-01-01T00:00:00Z"),
                ("x-request-id", "kept"),
            ],
            b"{}",
            None,
        );
        if listing_fails {
            host.fail(&[Op::ResponseHeaderNames]);
        }
        host.calls.take();
        router.on_response_headers(&mut host, false);
        assert_eq!(host.resp("anthropic-ratelimit-tokens-reset"), None);
        assert_eq!(host.resp("x-request-id").as_deref(), Some("kept"));
        assert_ne!(
            host.resp("x-ratelimit-remaining-requests").as_deref(),
            Some("5"),
            "the caller's own limit replaces the provider's"
        );
        // Listed: only the two present names cost a removal.
        let removals = host
            .calls
            .borrow()
            .get("remove_response_header")
            .map(|c| c.0);
        let want = if listing_fails {
            PROVIDER_RATE_LIMIT_HEADERS.len()
        } else {
            2
        };
        assert_eq!(
            removals,
            Some(want as u64),
            "listing fails: {listing_fails}"
        );
    }
}

#[test]
fn a_refused_request_gets_an_openai_429_and_reserves_nothing() {
    let cfg = quota_config();
    let body = chat_body(&quote("chain"));
    let mut host = MockHost::default();
    for i in 0..3 {
        host.request_headers = client_post("/v1/chat/completions", body.as_bytes())
            .with_header("x-caller", "team/api")
            .request_headers;
        host.request_body = body.as_bytes().to_vec();
        host.sent.clear();
        let mut router = Filter::new(Rc::clone(&cfg), Role::Router);
        router.on_request_headers(&mut host, false);
        let flow = router.on_request_body(&mut host, body.len(), true);
        if i < 2 {
            assert_eq!(flow, Flow::Continue);
            router.on_done(&mut host);
            continue;
        }
        assert_eq!(flow, Flow::Pause);
        let sent = host.reply();
        assert_eq!(sent.status, 429);
        let e = error_fields(&sent.body);
        assert_eq!(
            (e.kind.as_str(), e.code.as_deref()),
            ("requests", Some("rate_limit_exceeded"))
        );
        let header = |n: &str| {
            sent.headers
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(
            header("x-ratelimit-remaining-requests").as_deref(),
            Some("0")
        );
        assert!(header("retry-after").is_some());
    }
    let used: Vec<u64> = team_standings(&host).iter().map(|s| s.used).collect();
    // Two abandoned requests: no answer, so no tokens; two requests counted.
    assert!(used.contains(&2) && used.contains(&0), "{used:?}");
    let rejected = host.counters.keys().any(|k| {
        k.starts_with(
            "meshllm_quota_rejections_total;caller_namespace=team;caller_service=api;\
             gen_ai_request_model=chain;limit=team;reason=rate",
        )
    });
    assert!(rejected);
}

// Model rules bind what serves: every name that leads to a model, and each
// position of a chain where it may serve.

const BOUND_CONFIG: &str = r#"{
  "providers": [
    {"name": "azure", "kind": "azure_openai", "base_url": "https://res.openai.azure.com",
     "api_version": "2024-10-21", "api_key_env": "AZURE_KEY"},
    {"name": "groq", "kind": "openai_compatible", "base_url": "https://api.groq.com/openai/v1",
     "api_key_env": "GROQ_API_KEY"},
    {"name": "nokey", "kind": "openai_compatible", "base_url": "https://nokey.example/v1",
     "api_key_env": "NOKEY_API_KEY"}
  ],
  "models": [
    {"name": "azure-gpt-4o", "provider": "azure", "model": "gpt-4o", "aliases": ["4o"]},
    {"name": "fast", "provider": "groq", "model": "llama-3.1-8b-instant"},
    {"name": "broken", "provider": "nokey"}
  ],
  "routes": [
    {"name": "only-4o", "targets": ["azure-gpt-4o"]},
    {"name": "4o-first", "targets": ["azure-gpt-4o", "fast"]},
    {"name": "fast-first", "targets": ["fast", "azure-gpt-4o"]}
  ],
  "identity": {"source": "trusted_header", "header": "x-caller"},
  "namespaces": {"team": {"aliases": {"house": "azure-gpt-4o"}}}
}"#;

const GPT4O_BUCKET: &str = "meshllm/quota/v1/gpt-4o-daily";
const FAST_BUCKET: &str = "meshllm/quota/v1/fast-daily";

/// BOUND_CONFIG with these quota rules.
fn bound_config(limits: Value) -> Rc<Config> {
    let mut doc: Value = serde_json::from_str(BOUND_CONFIG).unwrap();
    doc["quotas"] = serde_json::json!({ "limits": limits });
    config_from(&doc.to_string())
}

/// (requests, tokens) used in `key` under rule `rule` of the config.
fn bucket_use(cfg: &Config, host: &MockHost, rule: &str, key: &str) -> (u64, u64) {
    let rule = cfg
        .quotas
        .as_ref()
        .unwrap()
        .rules
        .iter()
        .find(|r| r.name == rule)
        .unwrap();
    let standings =
        crate::quota::buckets::standings(host, key, &rule.limits, host.now_unix_millis());
    let used = |meter| {
        standings
            .iter()
            .find(|s| s.limit.meter == meter)
            .map_or(0, |s| s.used)
    };
    (
        used(crate::quota::buckets::Meter::Requests),
        used(crate::quota::buckets::Meter::Tokens),
    )
}

/// Runs a chat request for `model` through the listener half (`host`
/// keeps the shared data between requests).
fn bound_request(
    cfg: &Rc<Config>,
    host: &mut MockHost,
    caller: &str,
    model: &str,
    fallbacks: Option<&str>,
) -> (Filter, Flow) {
    let body = chat_body(&quote(model));
    let mut fresh =
        client_post("/v1/chat/completions", body.as_bytes()).with_header("x-caller", caller);
    if let Some(names) = fallbacks {
        fresh = fresh.with_header(MODELS_REQUEST_HEADER, names);
    }
    host.request_headers = fresh.request_headers;
    host.request_body = fresh.request_body;
    host.response_headers.clear();
    host.sent.clear();
    host.properties.clear();
    let mut f = Filter::new(Rc::clone(cfg), Role::Router);
    assert_eq!(f.on_request_headers(host, false), Flow::Pause);
    let flow = f.on_request_body(host, body.len(), true);
    (f, flow)
}

fn answer_header<'a>(f: &'a Filter, name: &str) -> Option<&'a str> {
    router(f)
        .req
        .answer_headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

#[test]
fn a_model_rule_binds_every_name_that_leads_to_the_model() {
    // Written with the alias: it binds the model, whatever name is used.
    let cfg = bound_config(serde_json::json!([
        {"name": "gpt-4o-daily", "match": {"model": "4o"}, "requests_per_day": 2}
    ]));
    let azure = cfg.route_index("azure-gpt-4o").unwrap();
    let fast = cfg.route_index("fast").unwrap();
    let mut host = MockHost::default();
    for (model, remaining) in [("azure-gpt-4o", "1"), ("only-4o", "0")] {
        let (mut f, flow) = bound_request(&cfg, &mut host, "shop/app", model, None);
        assert_eq!(flow, Flow::Continue, "{model}: {:?}", host.sent);
        assert_eq!(router(&f).req.route, Some(azure));
        assert_eq!(answer_header(&f, "x-ratelimit-limit-requests"), Some("2"));
        assert_eq!(
            answer_header(&f, "x-ratelimit-remaining-requests"),
            Some(remaining),
            "{model}: a route shows the limit of the model it is sent to"
        );
        f.on_done(&mut host);
    }
    assert_eq!(bucket_use(&cfg, &host, "gpt-4o-daily", GPT4O_BUCKET).0, 2);

    // Every name that can only lead to the model is refused.
    let escapes: [(&str, &str, Option<&str>); 6] = [
        ("shop/app", "azure-gpt-4o", None),
        ("shop/app", "4o", None),
        ("team/app", "house", None),
        ("shop/app", "only-4o", None),
        // The body's model cannot serve (no key): the fallback is the model.
        ("shop/app", "broken", Some("4o")),
        ("team/app", "broken", Some("house, only-4o")),
    ];
    for (caller, model, fallbacks) in escapes {
        let (mut f, flow) = bound_request(&cfg, &mut host, caller, model, fallbacks);
        assert_eq!(flow, Flow::Pause, "{model} {fallbacks:?} was not refused");
        let sent = host.reply();
        assert_eq!(sent.status, 429);
        let e = error_fields(&sent.body);
        assert_eq!(
            (e.kind.as_str(), e.code.as_deref()),
            ("requests", Some("rate_limit_exceeded"))
        );
        assert!(
            e.message
                .contains("requests_per_day in limit 'gpt-4o-daily': Limit 2, Used 2, Requested 1"),
            "{}",
            e.message
        );
        assert_eq!(sent.header("x-ratelimit-remaining-requests"), Some("0"));
        assert!(sent.header("retry-after").is_some());
        f.on_done(&mut host);
    }
    // A chain with another target is served by it, and says why.
    for model in ["4o-first", "fast-first"] {
        let (mut f, flow) = bound_request(&cfg, &mut host, "shop/app", model, None);
        assert_eq!(flow, Flow::Continue, "{model}");
        assert_eq!(router(&f).req.route, Some(fast));
        assert_eq!(
            router(&f).req.reason.as_deref(),
            Some("ordered;over_quota=azure-gpt-4o"),
            "{model}"
        );
        assert_eq!(
            answer_header(&f, "x-ratelimit-limit-requests"),
            None,
            "no limit binds the target it is sent to"
        );
        f.on_done(&mut host);
    }
    let (mut f, flow) = bound_request(&cfg, &mut host, "shop/app", "4o", Some("fast"));
    assert_eq!(flow, Flow::Continue);
    assert_eq!(router(&f).req.route, Some(fast));
    assert_eq!(
        router(&f).req.reason.as_deref(),
        Some("request;model;over_quota=azure-gpt-4o")
    );
    f.on_done(&mut host);
    assert_eq!(
        bucket_use(&cfg, &host, "gpt-4o-daily", GPT4O_BUCKET).0,
        2,
        "nothing more was counted on the model"
    );
    let rejected: u64 = host
        .counters
        .iter()
        .filter(|(k, _)| {
            k.starts_with("meshllm_quota_rejections_total;") && k.contains(";limit=gpt-4o-daily;")
        })
        .map(|(_, n)| n)
        .sum();
    assert_eq!(rejected, 6);
}

#[test]
fn a_chain_reserves_each_bound_target_and_settles_on_the_one_that_answered() {
    let cfg = bound_config(serde_json::json!([
        {"name": "gpt-4o-daily", "match": {"model": "azure-gpt-4o"},
         "requests_per_day": 3, "tokens_per_day": 1000000},
        {"name": "fast-daily", "match": {"model": "fast"},
         "requests_per_day": 5, "tokens_per_day": 1000000}
    ]));
    let azure = cfg.route_index("azure-gpt-4o").unwrap();
    let fast = cfg.route_index("fast").unwrap();
    let use_of = |host: &MockHost| {
        (
            bucket_use(&cfg, host, "gpt-4o-daily", GPT4O_BUCKET),
            bucket_use(&cfg, host, "fast-daily", FAST_BUCKET),
        )
    };
    let mut host = MockHost::default();

    // In flight, a request holds a reservation on every target it may reach.
    let (mut f, flow) = bound_request(&cfg, &mut host, "shop/app", "4o-first", None);
    assert_eq!(flow, Flow::Continue);
    assert_eq!(host.req("x-envoy-max-retries").as_deref(), Some("1"));
    let ((r4o, t4o), (rfast, tfast)) = use_of(&host);
    assert_eq!((r4o, rfast), (1, 1));
    assert!(t4o > 0 && t4o == tfast);
    // The caller sees the limits of the first target.
    assert_eq!(answer_header(&f, "x-ratelimit-limit-requests"), Some("3"));
    assert_eq!(
        answer_header(&f, "x-ratelimit-remaining-requests"),
        Some("2")
    );
    // The first target failed, the second answered: the failed one counts
    // one request and no tokens, the one that answered its usage.
    host.properties.insert(
        USAGE_PROPERTY.into(),
        format!("{fast},30,12,0,0").into_bytes(),
    );
    host.respond(
        200,
        &[
            (ATTEMPTS_RESPONSE_HEADER, "2"),
            (PROVIDER_RESPONSE_HEADER, "groq"),
            (MODEL_RESPONSE_HEADER, "llama-3.1-8b-instant"),
        ],
        b"{}",
        None,
    );
    // A chain's complete answer is held to its end.
    assert_eq!(f.on_response_headers(&mut host, false), Flow::Pause);
    assert_eq!(f.on_response_body(&mut host, 2, true), Flow::Continue);
    assert_eq!(use_of(&host), ((1, 0), (1, 42)));

    // Answered at once: the target it did not reach gets its reservation back.
    let (mut f, flow) = bound_request(&cfg, &mut host, "shop/app", "4o-first", None);
    assert_eq!(flow, Flow::Continue);
    host.properties.insert(
        USAGE_PROPERTY.into(),
        format!("{azure},10,5,0,0").into_bytes(),
    );
    host.respond(
        200,
        &[
            (ATTEMPTS_RESPONSE_HEADER, "1"),
            (PROVIDER_RESPONSE_HEADER, "azure"),
            (MODEL_RESPONSE_HEADER, "gpt-4o"),
        ],
        b"{}",
        None,
    );
    f.on_response_headers(&mut host, false);
    f.on_response_body(&mut host, 2, true);
    assert_eq!(use_of(&host), ((2, 15), (1, 42)));

    // Abandoned before any answer: which targets were tried is not known,
    // so each one it may have reached counts a request (never fewer).
    let (mut f, flow) = bound_request(&cfg, &mut host, "shop/app", "4o-first", Some("broken"));
    assert_eq!(flow, Flow::Continue);
    assert!(!direct(&f));
    f.on_done(&mut host);
    assert_eq!(use_of(&host), ((3, 15), (2, 42)));

    // The model's limit is spent: the chain goes straight to the other one.
    let (mut f, flow) = bound_request(&cfg, &mut host, "shop/app", "4o-first", None);
    assert_eq!(flow, Flow::Continue);
    assert!(
        direct(&f),
        "one target left: served without the upstream half"
    );
    assert_eq!(router(&f).req.route, Some(fast));
    assert_eq!(
        router(&f).req.reason.as_deref(),
        Some("ordered;over_quota=azure-gpt-4o")
    );
    assert_eq!(answer_header(&f, "x-ratelimit-limit-requests"), Some("5"));
    assert_eq!(
        answer_header(&f, "x-ratelimit-remaining-requests"),
        Some("2")
    );
    f.on_done(&mut host);
    assert_eq!(use_of(&host), ((3, 15), (3, 42)));
}

#[test]
fn a_refusal_on_every_target_names_the_limit_that_clears_first() {
    let cfg = bound_config(serde_json::json!([
        {"name": "gpt-4o-daily", "match": {"model": "azure-gpt-4o"}, "requests_per_day": 1},
        {"name": "fast-minute", "match": {"model": "fast"}, "requests_per_minute": 1}
    ]));
    let mut host = MockHost::default();
    for model in ["azure-gpt-4o", "fast"] {
        let (mut f, flow) = bound_request(&cfg, &mut host, "shop/app", model, None);
        assert_eq!(flow, Flow::Continue);
        f.on_done(&mut host);
    }
    let before = host.shared.values.clone();
    let (_, flow) = bound_request(&cfg, &mut host, "shop/app", "4o-first", None);
    assert_eq!(flow, Flow::Pause);
    let sent = host.reply();
    assert_eq!(sent.status, 429);
    let e = error_fields(&sent.body);
    assert!(
        e.message.contains("in limit 'fast-minute'"),
        "{}",
        e.message
    );
    let wait: u64 = sent.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    assert_eq!(host.shared.values, before, "nothing stays reserved");
}

#[test]
fn request_wide_limits_still_refuse_and_release_the_targets() {
    let cfg = bound_config(serde_json::json!([
        {"name": "gpt-4o-daily", "match": {"model": "azure-gpt-4o"}, "requests_per_day": 10},
        {"name": "shop", "match": {"namespace": "shop"}, "requests_per_day": 1}
    ]));
    let mut host = MockHost::default();
    let (mut f, flow) = bound_request(&cfg, &mut host, "shop/app", "4o-first", None);
    assert_eq!(flow, Flow::Continue);
    assert_eq!(answer_header(&f, "x-ratelimit-limit-requests"), Some("1"));
    f.on_done(&mut host);
    let (_, flow) = bound_request(&cfg, &mut host, "shop/app", "4o-first", None);
    assert_eq!(flow, Flow::Pause);
    assert!(error_fields(&host.reply().body)
        .message
        .contains("in limit 'shop'"));
    assert_eq!(
        bucket_use(&cfg, &host, "gpt-4o-daily", GPT4O_BUCKET).0,
        1,
        "the refused request's target reservation was released"
    );
}

#[test]
fn each_model_rules_count_per_model_whatever_the_name() {
    let cfg = bound_config(serde_json::json!([
        {"name": "per-model", "match": {"model": "*"}, "requests_per_day": 1}
    ]));
    let mut store = MockHost::default();
    crate::quota::admission::prepare_buckets(&cfg, &mut store);
    let mut keys: Vec<&String> = store.shared.values.keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "meshllm/quota/v1/per-model|model=azure-gpt-4o",
            "meshllm/quota/v1/per-model|model=broken",
            "meshllm/quota/v1/per-model|model=fast"
        ],
        "per-model buckets exist before the first request"
    );
    let mut host = store;
    let (mut f, flow) = bound_request(&cfg, &mut host, "shop/app", "only-4o", None);
    assert_eq!(flow, Flow::Continue);
    f.on_done(&mut host);
    for (model, want) in [("4o", Flow::Pause), ("fast", Flow::Continue)] {
        let (mut f, flow) = bound_request(&cfg, &mut host, "shop/app", model, None);
        assert_eq!(flow, want, "{model}");
        f.on_done(&mut host);
    }
}

#[test]
fn a_route_rule_binds_the_routes_targets_when_the_request_names_it() {
    let cfg = bound_config(serde_json::json!([
        {"name": "route-daily", "match": {"model": "4o-first"}, "requests_per_day": 1}
    ]));
    let mut host = MockHost::default();
    let (mut f, flow) = bound_request(&cfg, &mut host, "shop/app", "fast", Some("4o-first"));
    assert_eq!(flow, Flow::Continue);
    f.on_done(&mut host);
    // Spent: naming the route refuses its targets; not naming it does not.
    let (_, flow) = bound_request(&cfg, &mut host, "shop/app", "4o-first", None);
    assert_eq!(flow, Flow::Pause);
    assert!(error_fields(&host.reply().body)
        .message
        .contains("'route-daily'"));
    for model in ["azure-gpt-4o", "fast-first"] {
        let (mut f, flow) = bound_request(&cfg, &mut host, "shop/app", model, None);
        assert_eq!(flow, Flow::Continue, "{model}");
        f.on_done(&mut host);
    }
}

#[test]
fn downgrades_follow_the_model_whatever_name_asked_for_it() {
    let cfg = bound_config(serde_json::json!([
        {"name": "gpt-4o-daily", "match": {"model": "azure-gpt-4o"}, "requests_per_day": 2,
         "downgrade": {"at_percent": 50, "models": {"4o": "fast", "only-4o": "fast"}}}
    ]));
    let fast = cfg.route_index("fast").unwrap();
    let mut host = MockHost::default();
    let (mut f, flow) = bound_request(&cfg, &mut host, "shop/app", "azure-gpt-4o", None);
    assert_eq!(flow, Flow::Continue);
    assert_eq!(answer_header(&f, DOWNGRADE_RESPONSE_HEADER), None);
    f.on_done(&mut host);
    // Half the model's budget is used: each of its names, and the route
    // listed, is served as `fast`.
    for (model, shown) in [
        ("azure-gpt-4o", "azure-gpt-4o->fast;limit=gpt-4o-daily"),
        ("4o", "4o->fast;limit=gpt-4o-daily"),
        ("only-4o", "only-4o->fast;limit=gpt-4o-daily"),
    ] {
        let (mut f, flow) = bound_request(&cfg, &mut host, "shop/app", model, None);
        assert_eq!(flow, Flow::Continue, "{model}");
        assert_eq!(router(&f).req.route, Some(fast), "{model}");
        assert_eq!(answer_header(&f, DOWNGRADE_RESPONSE_HEADER), Some(shown));
        f.on_done(&mut host);
    }
}

#[test]
fn unidentified_callers_get_403_in_their_own_shape() {
    let cfg = quota_config();
    let body = br#"{"model":"chain","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#;
    let mut host = MockHost::new("POST", "/v1/messages").with_body(body);
    let mut router = Filter::new(Rc::clone(&cfg), Role::Router);
    assert_eq!(router.on_request_headers(&mut host, false), Flow::Pause);
    let sent = host.reply();
    assert_eq!(sent.status, 403);
    let v: Value = serde_json::from_slice(&sent.body).unwrap();
    assert_eq!(v["error"]["type"], "permission_error");
}

#[test]
fn streamed_answers_time_their_first_byte_and_their_pace() {
    let body = chat_body(&quote("fast")).replace("\"stream\": false", "\"stream\": true");
    let (mut f, mut host, flow) = post("/v1/chat/completions", body.as_bytes());
    assert_eq!(flow, Flow::Continue);
    let start_ms = host.now_unix_millis();
    host.respond(
        200,
        &[("content-type", "text/event-stream")],
        b"",
        Some("via_upstream"),
    );
    assert_eq!(f.on_response_headers(&mut host, false), Flow::Continue);
    // The first event 250 ms after the request, the last 600 ms later.
    host.now_ms = start_ms + 250;
    let first = b"data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"hi\"}}]}\n\n";
    host.response_body = first.to_vec();
    f.on_response_body(&mut host, first.len(), false);
    host.now_ms = start_ms + 850;
    let last = b"data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7,\"total_tokens\":12}}\n\ndata: [DONE]\n\n";
    host.response_body = last.to_vec();
    f.on_response_body(&mut host, last.len(), true);
    let labels = "caller_namespace=unknown;caller_service=unknown;gen_ai_operation_name=chat;\
                  gen_ai_provider_name=groq;gen_ai_request_model=fast;\
                  gen_ai_response_model=llama-3.1-8b-instant";
    let recorded = |metric: &str| {
        host.histograms
            .get(&format!("{metric};{labels}"))
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(recorded("gen_ai.server.time_to_first_token"), [250]);
    // 600 ms over the 6 tokens after the first.
    assert_eq!(recorded("gen_ai.server.time_per_output_token"), [100]);
    assert_eq!(recorded("gen_ai.server.request.duration"), [850]);
    assert_eq!(
        host.properties.get("meshllm.ttft_ms").map(Vec::as_slice),
        Some(&b"250"[..])
    );
    assert_eq!(
        host.properties
            .get("meshllm.output_tokens")
            .map(Vec::as_slice),
        Some(&b"7"[..])
    );
}

#[test]
fn requests_for_other_hosts_pass_through_both_halves() {
    let doc: serde_json::Value = serde_json::from_str(CONFIG).unwrap();
    let mut doc = doc.as_object().unwrap().clone();
    doc.insert("hosts".into(), serde_json::json!(["llm.mesh"]));
    let cfg = config_from(&serde_json::Value::Object(doc).to_string());
    let body = chat_body(&quote("mini"));
    for role in [Role::Router, Role::Standalone, Role::Attempt] {
        let mut host = client_post("/v1/chat/completions", body.as_bytes())
            .with_only_header(":authority", "reviews.default.svc:9080");
        let before_body = host.request_body.clone();
        let mut f = Filter::new(Rc::clone(&cfg), role);
        assert_eq!(
            f.on_request_headers(&mut host, false),
            Flow::Continue,
            "{role:?}"
        );
        assert_eq!(
            f.on_request_body(&mut host, body.len(), true),
            Flow::Continue
        );
        assert!(host.sent.is_empty(), "{role:?}: no reply of its own");
        assert_eq!(host.request_body, before_body, "{role:?}");
        assert_eq!(
            host.req("authorization").as_deref(),
            Some("Bearer client-secret")
        );
        if role != Role::Attempt {
            assert_eq!(
                host.req(CLUSTER_HEADER),
                None,
                "{role:?}: never client-chosen"
            );
        }
        host.respond(200, &[], b"{}", Some("via_upstream"));
        assert_eq!(f.on_response_headers(&mut host, false), Flow::Continue);
        assert_eq!(f.on_response_body(&mut host, 2, true), Flow::Continue);
        f.on_done(&mut host);
        assert!(host.counters.is_empty(), "{role:?}: {:?}", host.counters);
        assert_eq!(host.resp(PROVIDER_RESPONSE_HEADER), None);
    }
    // The configured host is handled.
    let mut host = client_post("/v1/chat/completions", body.as_bytes())
        .with_only_header(":authority", "llm.mesh");
    let mut f = Filter::new(Rc::clone(&cfg), Role::Standalone);
    assert_eq!(f.on_request_headers(&mut host, false), Flow::Pause);
}

// ---------------------------------------------------------------------------
// Namespace policies: allow-lists, aliases, quota rules, listener metadata.

fn ns_config() -> Rc<Config> {
    let mut doc: Value = serde_json::from_str(ROUTED_CONFIG).unwrap();
    doc["identity"] = serde_json::json!({"source": "trusted_header", "header": "x-caller"});
    doc["allowed_models"] = serde_json::json!(["azure-gpt-4o", "chain"]);
    doc["namespaces"] = serde_json::json!({
        "shop": {
            "aliases": {"quick": "fast"},
            "allowed_models": ["quick", "azure-gpt-4o"],
            "quotas": {"limits": [{"name": "tiny", "requests_per_day": 1}]}
        },
        "down": {"quotas": {"limits": [{"name": "d", "requests_per_day": 10,
            "downgrade": {"at_percent": 1, "models": {"azure-gpt-4o": "fast"}}}]}},
        "down2": {"allowed_models": ["azure-gpt-4o", "fast"],
            "quotas": {"limits": [{"name": "d", "requests_per_day": 10,
            "downgrade": {"at_percent": 1, "models": {"azure-gpt-4o": "fast"}}}]}}
    });
    config_from(&doc.to_string())
}

/// A call by `caller` through a fresh filter of `role` on `host`'s state
/// (shared data and listener metadata carry over between calls).
fn ns_call(
    cfg: &Rc<Config>,
    role: Role,
    host: &mut MockHost,
    path: &str,
    body: &str,
    caller: &str,
) -> (Filter, Flow) {
    ns_call_with(cfg, role, host, path, body, caller, &[])
}

/// [`ns_call`] with more request headers.
fn ns_call_with(
    cfg: &Rc<Config>,
    role: Role,
    host: &mut MockHost,
    path: &str,
    body: &str,
    caller: &str,
    headers: &[(&str, &str)],
) -> (Filter, Flow) {
    let mut fresh = client_post(path, body.as_bytes()).with_header("x-caller", caller);
    for (name, value) in headers {
        fresh = fresh.with_header(name, value);
    }
    fresh.shared = std::mem::take(&mut host.shared);
    let listener = listener_key();
    if let Some(policy) = host.properties.remove(&listener) {
        fresh.properties.insert(listener, policy);
    }
    fresh.counters = std::mem::take(&mut host.counters);
    *host = fresh;
    let mut f = Filter::new(Rc::clone(cfg), role);
    let flow = match f.on_request_headers(host, false) {
        Flow::Pause if host.sent.is_empty() => f.on_request_body(host, body.len(), true),
        other => other,
    };
    (f, flow)
}

const ANTHROPIC_BODY: &str =
    r#"{"model": "{MODEL}", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}"#;
const GEMINI_BODY: &str = r#"{"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}"#;

#[test]
fn refused_models_get_403_in_each_callers_shape_and_are_counted() {
    let cfg = ns_config();
    let mut host = MockHost::default();
    // OpenAI: the mesh list lacks `fast`.
    let body = chat_body(&quote("fast"));
    let (mut f, flow) = ns_call(
        &cfg,
        Role::Router,
        &mut host,
        "/v1/chat/completions",
        &body,
        "misc/app",
    );
    assert_eq!(flow, Flow::Pause);
    let sent = host.reply().clone();
    assert_eq!(sent.status, 403);
    let e = error_fields(&sent.body);
    assert_eq!(
        (e.kind.as_str(), e.param.as_deref(), e.code.as_deref()),
        (
            "invalid_request_error",
            Some("model"),
            Some("model_not_allowed")
        )
    );
    assert!(
        e.message.contains("`fast`") && e.message.contains("misc/app"),
        "{}",
        e.message
    );
    assert_eq!(host.req(CLUSTER_HEADER), None, "nothing is routed");
    f.on_done(&mut host);
    let counted: Vec<&String> = host
        .counters
        .keys()
        .filter(|k| k.starts_with("meshllm_requests_total;") && k.contains("error_type=403"))
        .collect();
    assert_eq!(counted.len(), 1, "{:?}", host.counters);
    assert!(counted[0].contains("gen_ai_request_model=fast"));
    assert_eq!(host.properties[LOG_POLICY], b"mesh");

    // Anthropic: permission_error.
    let body = ANTHROPIC_BODY.replace("{MODEL}", "chain");
    ns_call(
        &cfg,
        Role::Router,
        &mut host,
        "/v1/messages",
        &body,
        "shop/chat",
    );
    let sent = host.reply();
    assert_eq!(sent.status, 403);
    let v = sent.json();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "permission_error");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("namespace's policy"));

    // Gemini: PERMISSION_DENIED.
    ns_call(
        &cfg,
        Role::Standalone,
        &mut host,
        "/v1beta/models/fast:generateContent",
        GEMINI_BODY,
        "misc/app",
    );
    let sent = host.reply();
    assert_eq!(sent.status, 403);
    let v = sent.json();
    assert_eq!(v["error"]["code"], 403);
    assert_eq!(v["error"]["status"], "PERMISSION_DENIED");

    // Unknown names keep their 404.
    let body = chat_body(&quote("nope"));
    ns_call(
        &cfg,
        Role::Router,
        &mut host,
        "/v1/chat/completions",
        &body,
        "shop/chat",
    );
    assert_eq!(host.reply().status, 404);
    assert_eq!(
        error_fields(&host.reply().body).code.as_deref(),
        Some("model_not_found")
    );

    // A caller's own fallbacks pass the same policy.
    let body = chat_body(&quote("azure-gpt-4o"));
    let mut h = client_post("/v1/chat/completions", body.as_bytes())
        .with_header("x-caller", "misc/app")
        .with_header(MODELS_REQUEST_HEADER, "fast");
    let mut f = Filter::new(Rc::clone(&cfg), Role::Router);
    f.on_request_headers(&mut h, false);
    f.on_request_body(&mut h, body.len(), true);
    assert_eq!(h.reply().status, 403);
}

#[test]
fn namespace_aliases_reach_their_model_in_both_halves_and_without_failover() {
    let cfg = ns_config();
    let mut host = MockHost::default();
    let body = chat_body(&quote("quick"));
    let (mut router, flow) = ns_call(
        &cfg,
        Role::Router,
        &mut host,
        "/v1/chat/completions",
        &body,
        "shop/chat",
    );
    assert_eq!(flow, Flow::Continue, "{:?}", host.sent);
    // One target: the listener half serves it itself and sends it to the
    // first position's cluster, where the upstream half does not run.
    assert_eq!(host.req("x-meshllm-p0").as_deref(), Some("groq"));
    assert_eq!(host.req(CLUSTER_HEADER).as_deref(), Some("meshllm.p0"));
    assert!(!host.properties.contains_key(PLAN_PROPERTY));
    assert_eq!(host.req(":authority").as_deref(), Some("api.groq.com"));
    let sent: Value = serde_json::from_slice(&host.request_body).unwrap();
    assert_eq!(sent["model"], "llama-3.1-8b-instant");
    router.on_done(&mut host);
    assert_eq!(host.properties[LOG_POLICY], b"namespace");
    assert_eq!(host.properties[LOG_QUOTA], b"admitted");

    // Without failover the listener filter serves the alias itself; the
    // namespace's own rule (1 a day) refuses the next one.
    let (_, flow) = ns_call(
        &cfg,
        Role::Standalone,
        &mut host,
        "/v1/chat/completions",
        &body,
        "shop/chat",
    );
    assert_eq!(flow, Flow::Pause);
    assert_eq!(host.reply().status, 429);
    assert!(error_fields(&host.reply().body)
        .message
        .contains("'shop/tiny'"));
    let mut fresh = MockHost::default();
    let (_, flow) = ns_call(
        &cfg,
        Role::Standalone,
        &mut fresh,
        "/v1/chat/completions",
        &body,
        "shop/chat",
    );
    assert_eq!(flow, Flow::Continue, "{:?}", fresh.sent);
    assert_eq!(fresh.req(":authority").as_deref(), Some("api.groq.com"));
    let sent: Value = serde_json::from_slice(&fresh.request_body).unwrap();
    assert_eq!(sent["model"], "llama-3.1-8b-instant");
}

#[test]
fn downgrades_never_lead_to_a_model_the_caller_may_not_use() {
    let cfg = ns_config();
    let body = chat_body(&quote("azure-gpt-4o"));
    for (ns, second) in [("down", "azure"), ("down2", "groq")] {
        let mut host = MockHost::default();
        let caller = format!("{ns}/app");
        let (mut f, flow) = ns_call(
            &cfg,
            Role::Router,
            &mut host,
            "/v1/chat/completions",
            &body,
            &caller,
        );
        assert_eq!(flow, Flow::Continue);
        f.on_done(&mut host);
        // Past the threshold: `down` may not use `fast`, so no downgrade.
        let (_, flow) = ns_call(
            &cfg,
            Role::Router,
            &mut host,
            "/v1/chat/completions",
            &body,
            &caller,
        );
        assert_eq!(flow, Flow::Continue, "{ns}: {:?}", host.sent);
        assert_eq!(host.req("x-meshllm-p0").as_deref(), Some(second), "{ns}");
    }
}

/// Where the mock host keeps the listener metadata's `meshllm.policy`.
fn listener_key() -> String {
    namespace_policy::LISTENER_POLICY_PATH.join(".")
}

/// Puts `policy` in the listener metadata the host serves (None: none).
fn set_listener_policy(host: &mut MockHost, policy: Option<&[u8]>) {
    match policy {
        Some(policy) => host.properties.insert(listener_key(), policy.to_vec()),
        None => host.properties.remove(&listener_key()),
    };
}

/// A listing as `caller` sees it.
fn listing(cfg: &Rc<Config>, path: &str, caller: &str, listener: Option<&str>) -> Sent {
    let mut host = MockHost::new("GET", path).with_header("x-caller", caller);
    set_listener_policy(&mut host, listener.map(str::as_bytes));
    let mut f = Filter::new(Rc::clone(cfg), Role::Router);
    assert_eq!(f.on_request_headers(&mut host, true), Flow::Pause);
    host.reply().clone()
}

fn listed_ids(sent: &Sent) -> Vec<String> {
    let v = sent.json();
    let data = v.get("data").or_else(|| v.get("models")).unwrap();
    data.as_array()
        .unwrap()
        .iter()
        .map(|m| {
            m.get("id")
                .or_else(|| m.get("name"))
                .unwrap()
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

#[test]
fn listings_show_what_the_caller_may_use() {
    let cfg = ns_config();
    assert_eq!(
        listed_ids(&listing(&cfg, "/v1/models", "misc/app", None)),
        ["azure-gpt-4o", "chain"]
    );
    let shop = listing(&cfg, "/v1/models", "shop/chat", None);
    assert_eq!(listed_ids(&shop), ["azure-gpt-4o", "fast", "quick"]);
    assert_eq!(shop.json()["data"][2]["owned_by"], "groq");
    let mut anthropic = MockHost::new("GET", "/v1/models")
        .with_header("x-caller", "shop/chat")
        .with_header("anthropic-version", "2023-06-01");
    let mut f = Filter::new(Rc::clone(&cfg), Role::Router);
    f.on_request_headers(&mut anthropic, true);
    assert_eq!(
        listed_ids(anthropic.reply()),
        ["azure-gpt-4o", "fast", "quick"]
    );
    assert_eq!(
        listed_ids(&listing(&cfg, "/v1beta/models", "shop/chat", None)),
        ["models/azure-gpt-4o", "models/fast", "models/quick"]
    );
    // One model: allowed ones (aliases included) are shown, others are not.
    let one = listing(&cfg, "/v1/models/quick", "shop/chat", None);
    assert_eq!(
        (one.status, one.json()["owned_by"].clone()),
        (200, "groq".into())
    );
    assert_eq!(
        listing(&cfg, "/v1/models/chain", "shop/chat", None).status,
        404
    );
    assert_eq!(
        listing(&cfg, "/v1/models/quick", "misc/app", None).status,
        404
    );
    assert_eq!(
        listing(&cfg, "/v1beta/models/quick", "shop/chat", None).status,
        200
    );
    // The listener's policy wins; an invalid one fails closed.
    let over = listing(
        &cfg,
        "/v1/models",
        "shop/chat",
        Some(r#"{"aliases": {"q2": "chain"}}"#),
    );
    assert_eq!(listed_ids(&over), ["azure-gpt-4o", "chain", "q2"]);
    let bad = listing(&cfg, "/v1/models", "shop/chat", Some("[]"));
    assert_eq!(bad.status, 500);
    assert_eq!(
        error_fields(&bad.body).code.as_deref(),
        Some("invalid_namespace_policy")
    );
    // Without any policy the built-in listing is served as before.
    let plain = config_from(ROUTED_CONFIG);
    let sent = listing(&plain, "/v1/models", "misc/app", None);
    assert_eq!(sent.body, plain.models_list_body);
}

#[test]
fn listener_metadata_overrides_the_document_and_fails_closed_when_invalid() {
    let cfg = ns_config();
    let mut host = MockHost::default();
    set_listener_policy(
        &mut host,
        Some(br#"{"allowed_models": ["chain", "q"], "aliases": {"q": "fast"}}"#),
    );
    // The document lets shop use `quick`; the listener's policy does not know it.
    let body = chat_body(&quote("quick"));
    ns_call(
        &cfg,
        Role::Router,
        &mut host,
        "/v1/chat/completions",
        &body,
        "shop/chat",
    );
    assert_eq!(host.reply().status, 404);
    let body = chat_body(&quote("azure-gpt-4o"));
    ns_call(
        &cfg,
        Role::Router,
        &mut host,
        "/v1/chat/completions",
        &body,
        "shop/chat",
    );
    assert_eq!(host.reply().status, 403);
    let body = chat_body(&quote("q"));
    let (mut f, flow) = ns_call(
        &cfg,
        Role::Router,
        &mut host,
        "/v1/chat/completions",
        &body,
        "shop/chat",
    );
    assert_eq!(flow, Flow::Continue);
    assert_eq!(host.req("x-meshllm-p0").as_deref(), Some("groq"));
    f.on_done(&mut host);
    assert_eq!(host.properties[LOG_POLICY], b"listener");
    assert_eq!(
        cfg.listener_policies.compiles(),
        1,
        "compiled once for three requests"
    );

    // Invalid: 500 in each caller's shape, naming the field.
    set_listener_policy(
        &mut host,
        Some(br#"{"services": {"chat": {"allowed_models": ["gpt-5"]}}}"#),
    );
    let body = chat_body(&quote("chain"));
    let (mut f, _) = ns_call(
        &cfg,
        Role::Router,
        &mut host,
        "/v1/chat/completions",
        &body,
        "shop/chat",
    );
    let sent = host.reply().clone();
    assert_eq!(sent.status, 500);
    let e = error_fields(&sent.body);
    assert_eq!(e.code.as_deref(), Some("invalid_namespace_policy"));
    assert!(
        e.message
            .contains("meshllm.policy.services.chat.allowed_models[0]"),
        "{}",
        e.message
    );
    f.on_done(&mut host);
    assert_eq!(host.properties[LOG_POLICY], b"listener");
    let body = ANTHROPIC_BODY.replace("{MODEL}", "chain");
    ns_call(
        &cfg,
        Role::Router,
        &mut host,
        "/v1/messages",
        &body,
        "shop/chat",
    );
    let v = host.reply().json();
    assert_eq!(
        (v["type"].as_str(), v["error"]["type"].as_str()),
        (Some("error"), Some("api_error"))
    );
    ns_call(
        &cfg,
        Role::Router,
        &mut host,
        "/v1beta/models/chain:generateContent",
        GEMINI_BODY,
        "shop/chat",
    );
    assert_eq!(host.reply().json()["error"]["status"], "INTERNAL");
    assert_eq!(
        cfg.listener_policies.compiles(),
        2,
        "the invalid value too: once"
    );
}

// ---------------------------------------------------------------------------
// Profiling driver (ignored): one realistic request through both halves of a
// sidecar, many times, printing the host calls each request makes. Run under
// callgrind with `--ignored --exact pipeline::tests::profile_<scenario>`.

const PROFILE_CONFIG: &str = r#"{
  "identity": {"source": "mesh_node"},
  "providers": [
    {"name": "openai", "kind": "openai", "api_key_env": "OPENAI_API_KEY"},
    {"name": "anthropic", "kind": "anthropic", "api_key_env": "ANTHROPIC_API_KEY"}
  ],
  "models": [
    {"name": "chat", "provider": "openai", "model": "gpt-4o-mini", "aliases": ["default"]},
    {"name": "claude", "provider": "anthropic", "model": "claude-sonnet-4-5"}
  ],
  "quotas": {"limits": [
    {"name": "shop", "match": {"namespace": "shop"},
     "requests_per_minute": 1000000000, "tokens_per_minute": 1000000000000}
  ]},
  "max_request_bytes": 4194304
}"#;

/// A chat body of about `size` bytes: a system prompt and user turns.
fn profile_body(model: &str, size: usize, stream: bool) -> Vec<u8> {
    let turn = "Summarise the quarterly figures for the northern region, please. ";
    let mut messages = vec![serde_json::json!({"role": "system", "content": "You are terse."})];
    let mut len = 200;
    while len < size {
        let content = turn.repeat(((size - len) / turn.len()).clamp(1, 200));
        len += content.len() + 40;
        messages.push(serde_json::json!({"role": "user", "content": content}));
    }
    serde_json::json!({
        "model": model, "messages": messages, "max_tokens": 256, "temperature": 0.2,
        "stream": stream,
    })
    .to_string()
    .into_bytes()
}

/// What the provider answers: status headers and body chunks.
struct ProfileAnswer {
    headers: Vec<(&'static str, &'static str)>,
    chunks: Vec<Vec<u8>>,
}

fn openai_answer() -> ProfileAnswer {
    ProfileAnswer {
        headers: vec![("content-type", "application/json"), ("content-length", "300")],
        chunks: vec![br#"{"id":"chatcmpl-1","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Revenue rose 4% in the north."},"finish_reason":"stop"}],"usage":{"prompt_tokens":250,"completion_tokens":9,"total_tokens":259}}"#.to_vec()],
    }
}

fn anthropic_answer() -> ProfileAnswer {
    ProfileAnswer {
        headers: vec![("content-type", "application/json"), ("content-length", "300")],
        chunks: vec![br#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"text","text":"Revenue rose 4% in the north."}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":250,"output_tokens":9}}"#.to_vec()],
    }
}

fn anthropic_stream_answer() -> ProfileAnswer {
    let mut events = vec![
        r#"event: message_start
data: {"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[],"stop_reason":null,"usage":{"input_tokens":250,"output_tokens":1}}}"#.to_string(),
        r#"event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#.into(),
    ];
    for word in ["Revenue ", "rose ", "4% ", "in ", "the ", "north", "."].repeat(4) {
        events.push(format!(
            "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"{word}\"}}}}"
        ));
    }
    events.push(
        r#"event: content_block_stop
data: {"type":"content_block_stop","index":0}"#
            .into(),
    );
    events.push(r#"event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":28}}"#.into());
    events.push("event: message_stop\ndata: {\"type\":\"message_stop\"}".into());
    ProfileAnswer {
        headers: vec![("content-type", "text/event-stream")],
        // A chunk per event, as a provider flushes them.
        chunks: events
            .into_iter()
            .map(|e| format!("{e}\n\n").into_bytes())
            .collect(),
    }
}

/// Host calls of one half, summed over the iterations.
type Tally = HashMap<&'static str, (u64, u64)>;

/// Runs one request through the listener half and one attempt; returns
/// the host calls each half made.
#[inline(never)]
fn profile_request(
    cfg: &Rc<Config>,
    shared: &mut MockShared,
    body: &[u8],
    answer: &ProfileAnswer,
) -> (Tally, Tally) {
    let node = [
        ("xds.node.metadata.NAMESPACE", "shop"),
        ("xds.node.metadata.LABELS.app", "checkout"),
    ];
    let mut host = MockHost::new("POST", "/v1/chat/completions")
        .with_header("content-type", "application/json")
        .with_header("content-length", &body.len().to_string())
        .with_header("authorization", "Bearer client-secret")
        .with_header("accept-encoding", "gzip, br")
        .with_header("user-agent", "openai-python/1.50.0")
        .with_header("x-request-id", "4bf92f35-77b3-4da6-a3ce-929d0e0e4736")
        .with_body(body);
    for (k, v) in node {
        host.properties.insert(k.into(), v.as_bytes().to_vec());
    }
    host.shared = std::mem::take(shared);
    let mut router = Filter::new(Rc::clone(cfg), Role::Router);
    assert_eq!(router.on_request_headers(&mut host, false), Flow::Pause);
    assert_eq!(
        router.on_request_body(&mut host, body.len(), true),
        Flow::Continue,
        "{:?}",
        host.sent
    );

    if !host.properties.contains_key(PLAN_PROPERTY) {
        // A single target: the listener half meets the provider's answer.
        host.respond(200, &answer.headers, b"", Some("via_upstream"));
        router.on_response_headers(&mut host, false);
        for (i, chunk) in answer.chunks.iter().enumerate() {
            let last = i + 1 == answer.chunks.len();
            host.response_body.extend_from_slice(chunk);
            let size = host.response_body.len();
            if router.on_response_body(&mut host, size, last) == Flow::Continue {
                host.response_body.clear();
            }
        }
        router.on_done(&mut host);
        assert!(host.sent.is_empty(), "{:?}", host.sent);
        *shared = std::mem::take(&mut host.shared);
        return (host.calls.take(), Default::default());
    }

    // Envoy's upstream filter: the same headers, the plan, position 0.
    let mut up = MockHost::new("POST", "/").with_body(body);
    up.request_headers = host.request_headers.clone();
    up.properties = host.properties.clone();
    up.properties
        .insert(POSITION_PROPERTY.into(), b"0".to_vec());
    up.shared = std::mem::take(&mut host.shared);
    up.calls = Default::default();
    let mut attempt = Filter::new(Rc::clone(cfg), Role::Attempt);
    assert_eq!(attempt.on_request_headers(&mut up, false), Flow::Pause);
    let size = up.request_body.len();
    assert_eq!(attempt.on_request_body(&mut up, size, true), Flow::Continue);
    up.respond(200, &answer.headers, b"", Some("via_upstream"));
    attempt.on_response_headers(&mut up, false);
    let mut answered = Vec::new();
    for (i, chunk) in answer.chunks.iter().enumerate() {
        let last = i + 1 == answer.chunks.len();
        up.response_body.extend_from_slice(chunk);
        let size = up.response_body.len();
        if attempt.on_response_body(&mut up, size, last) == Flow::Continue {
            answered.append(&mut up.response_body);
        }
    }
    attempt.on_done(&mut up);

    // Back in the listener half with what the attempt answered.
    host.shared = std::mem::take(&mut up.shared);
    if let Some(usage) = up.properties.get(USAGE_PROPERTY) {
        host.properties.insert(USAGE_PROPERTY.into(), usage.clone());
    }
    host.response_headers = up.response_headers.clone();
    host.response_body = answered;
    router.on_response_headers(&mut host, false);
    let size = host.response_body.len();
    router.on_response_body(&mut host, size, true);
    router.on_done(&mut host);
    assert!(host.sent.is_empty(), "{:?}", host.sent);
    *shared = std::mem::take(&mut host.shared);
    (host.calls.take(), up.calls.take())
}

/// Host calls per request of each half, by kind, over `iterations`
/// requests (the listener half's, the upstream half's); the body it sent.
fn host_calls(
    model: &str,
    body_size: usize,
    stream: bool,
    answer: &ProfileAnswer,
    iterations: u64,
) -> (Tally, Tally, Vec<u8>) {
    let cfg = Rc::new(testing::config(PROFILE_CONFIG));
    let mut shared = MockShared::default();
    crate::quota::admission::prepare_buckets(&cfg, &mut shared);
    let body = profile_body(model, body_size, stream);
    let (mut listener, mut upstream) = (Tally::new(), Tally::new());
    for _ in 0..iterations {
        let (l, u) = profile_request(&cfg, &mut shared, &body, answer);
        for (total, half) in [(&mut listener, l), (&mut upstream, u)] {
            for (kind, (n, bytes)) in half {
                let t = total.entry(kind).or_default();
                t.0 += n;
                t.1 += bytes;
            }
        }
    }
    for tally in [&mut listener, &mut upstream] {
        for (n, bytes) in tally.values_mut() {
            *n /= iterations;
            *bytes /= iterations;
        }
    }
    (listener, upstream, body)
}

fn total_calls(tally: &Tally) -> u64 {
    tally.values().map(|(n, _)| n).sum()
}

/// The host calls one request makes, counted, not timed: the issue-23
/// budget's one line a unit test can hold. Each call crosses the Wasm VM's
/// boundary (or the module ABI); the ceilings are today's counts, so a
/// change that adds calls fails here and must say why (bench/README.md).
#[test]
fn host_calls_per_request_stay_within_their_ceilings() {
    for (name, model, stream, answer, ceiling) in [
        ("passthrough", "default", false, openai_answer(), 69),
        (
            "OpenAI to Anthropic",
            "claude",
            false,
            anthropic_answer(),
            74,
        ),
        // 20 content events and 4 others: two calls per chunk.
        (
            "OpenAI to Anthropic, streamed",
            "claude",
            true,
            anthropic_stream_answer(),
            142,
        ),
    ] {
        // Averaged over ten: the first request also reads what later ones
        // find cached.
        let (listener, upstream, _) = host_calls(model, 1024, stream, &answer, 10);
        let total = total_calls(&listener);
        assert!(
            total <= ceiling,
            "{name}: {total} host calls per request, ceiling {ceiling}: {listener:?}"
        );
        // A single target: the upstream half never runs.
        assert_eq!(total_calls(&upstream), 0, "{name}: {upstream:?}");
        // Request headers are checked from one listing, not one call each.
        assert_eq!(listener["request_header_names"].0, 1, "{name}");
        assert!(listener["request_header"].0 <= 3, "{name}: {listener:?}");
    }
}

fn profile(name: &str, model: &str, body_size: usize, stream: bool, answer: ProfileAnswer) {
    let iterations: u64 = std::env::var("PROFILE_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if body_size > 100_000 { 20 } else { 1000 });
    let (listener, upstream, body) = host_calls(model, body_size, stream, &answer, iterations);
    eprintln!(
        "{name}: {} byte request, {iterations} iterations; host calls per request (bytes):",
        body.len()
    );
    for (half, tally) in [("listener", &listener), ("upstream", &upstream)] {
        let mut kinds: Vec<_> = tally.iter().collect();
        kinds.sort();
        let shown: Vec<String> = kinds
            .iter()
            .map(|(k, (n, b))| format!("{k}={n}({b})"))
            .collect();
        eprintln!("  {half}: total={} {}", total_calls(tally), shown.join(" "));
    }
    assert!(listener.contains_key("set_property"));
}

#[test]
#[ignore = "profiling driver"]
fn profile_passthrough_1k() {
    profile("passthrough_1k", "default", 1024, false, openai_answer());
}

#[test]
#[ignore = "profiling driver"]
fn profile_translate_anthropic_1k() {
    profile(
        "translate_anthropic_1k",
        "claude",
        1024,
        false,
        anthropic_answer(),
    );
}

#[test]
#[ignore = "profiling driver"]
fn profile_translate_anthropic_1m() {
    profile(
        "translate_anthropic_1m",
        "claude",
        1 << 20,
        false,
        anthropic_answer(),
    );
}

#[test]
#[ignore = "profiling driver"]
fn profile_stream_translate() {
    profile(
        "stream_translate",
        "claude",
        1024,
        true,
        anthropic_stream_answer(),
    );
}

#[test]
fn an_untranslatable_answer_of_a_chain_leaves_its_headers_to_envoy_and_becomes_a_502() {
    // The upstream half lets the headers pass (held there, a provider that
    // broke off mid-answer would be retried elsewhere); the listener half
    // holds them and gives the answer the status the upstream half chose.
    let cfg = config_from(ROUTED_CONFIG);
    let body = br#"{"model":"chain","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#;
    let mut host = client_post("/v1/messages", body).with_header("anthropic-version", "2023-06-01");
    let mut router = Filter::new(Rc::clone(&cfg), Role::Router);
    assert_eq!(router.on_request_headers(&mut host, false), Flow::Pause);
    assert_eq!(
        router.on_request_body(&mut host, body.len(), true),
        Flow::Continue
    );

    let mut up = MockHost::new("POST", "/v1/messages").with_body(body);
    up.request_headers = host.request_headers.clone();
    up.properties = host.properties.clone();
    up.properties
        .insert(POSITION_PROPERTY.into(), b"1".to_vec());
    let mut attempt = Filter::new(Rc::clone(&cfg), Role::Attempt);
    assert_eq!(attempt.on_request_headers(&mut up, false), Flow::Pause);
    assert_eq!(
        attempt.on_request_body(&mut up, body.len(), true),
        Flow::Continue
    );
    up.respond(
        200,
        &[("content-type", "application/json")],
        b"{\"choices\": [tru",
        None,
    );
    assert_eq!(attempt.on_response_headers(&mut up, false), Flow::Continue);
    assert_eq!(attempt.on_response_body(&mut up, 8, false), Flow::Pause);
    let size = up.response_body.len();
    assert_eq!(
        attempt.on_response_body(&mut up, size, true),
        Flow::Continue
    );
    assert_eq!(
        up.properties.get(ANSWER_STATUS_PROPERTY).map(Vec::as_slice),
        Some(&b"502"[..])
    );
    let error: Value = serde_json::from_slice(&up.response_body).unwrap();
    assert_eq!(error["type"], "error", "in the caller's (Anthropic) shape");

    host.properties = up.properties.clone();
    host.respond(
        200,
        &[
            (ATTEMPTS_RESPONSE_HEADER, "2"),
            (PROVIDER_RESPONSE_HEADER, "groq"),
        ],
        &up.response_body,
        None,
    );
    assert_eq!(router.on_response_headers(&mut host, false), Flow::Pause);
    assert_eq!(router.on_response_body(&mut host, 4, false), Flow::Pause);
    let size = host.response_body.len();
    assert_eq!(
        router.on_response_body(&mut host, size, true),
        Flow::Continue
    );
    assert_eq!(host.resp(":status").as_deref(), Some("502"));
}

#[test]
fn only_what_a_provider_did_is_an_attempts_end() {
    use AttemptEnd::*;
    let cases = [
        (503, None, Some(Answered(503))),
        (500, Some("via_upstream"), Some(Answered(500))),
        (
            503,
            Some("upstream_reset_before_response_started{connection_failure,delayed_connect_error:_Connection_refused}"),
            Some(ConnectFailure),
        ),
        (503, Some("upstream_reset_before_response_started{remote_reset}"), Some(Reset)),
        (503, Some("upstream_reset_before_response_started{connection_termination}"), Some(Reset)),
        (504, Some("upstream_per_try_timeout"), Some(Timeout)),
        (504, Some("upstream_response_timeout"), Some(Timeout)),
        // Envoy's own refusals: no provider was asked.
        (503, Some("no_healthy_upstream"), None),
        (503, Some("upstream_reset_before_response_started{overflow}"), None),
        (503, Some("upstream_reset_before_response_started{local_reset}"), None),
        (404, Some("cluster_not_found"), None),
    ];
    for (status, details, want) in cases {
        assert_eq!(
            AttemptEnd::of_envoy_reply(status, details),
            want,
            "{details:?}"
        );
    }
    assert_eq!(
        ConnectFailure.error_type().as_deref(),
        Some("connect_failure")
    );
    assert_eq!(Timeout.error_type().as_deref(), Some("timeout"));
    assert_eq!(Reset.error_type().as_deref(), Some("reset"));
    assert_eq!(Answered(200).error_type(), None);
}

// ---------------------------------------------------------------------------
// Answers the filter holds whole, and the caller-API mark for Envoy's replies
// ---------------------------------------------------------------------------

/// MULTI_CONFIG with a small `max_response_bytes`, and an Anthropic model.
fn limited_multi(limit: usize) -> Rc<Config> {
    let doc = MULTI_CONFIG.replacen(
        "\"models\": [",
        "\"max_response_bytes\": LIMIT, \"models\": [",
        1,
    );
    let doc = doc.replace("LIMIT", &limit.to_string());
    Rc::new(testing::config(&doc))
}

fn forwarded_with(config: Rc<Config>, path: &str, body: &[u8]) -> (Filter, MockHost) {
    let mut host = client_post(path, body);
    let mut f = Filter::new(config, Role::Standalone);
    assert_eq!(f.on_request_headers(&mut host, false), Flow::Pause);
    assert_eq!(
        f.on_request_body(&mut host, body.len(), true),
        Flow::Continue,
        "{:?}",
        host.sent
    );
    (f, host)
}

const ANTHROPIC_TO_GPT: &[u8] =
    br#"{"model":"gpt","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#;
const GEMINI_CALL: &[u8] = br#"{"contents":[{"role":"user","parts":[{"text":"hi"}]}]}"#;

#[test]
fn served_requests_name_the_callers_api_for_envoys_replies() {
    let openai = br#"{"model":"flash","messages":[{"role":"user","content":"hi"}]}"#;
    for (path, body, api) in [
        ("/v1/chat/completions", &openai[..], "openai"),
        ("/v1/messages", ANTHROPIC_TO_GPT, "anthropic"),
        ("/v1beta/models/gpt:generateContent", GEMINI_CALL, "gemini"),
    ] {
        let (_, host) = forwarded_with(limited_multi(1 << 20), path, body);
        assert_eq!(host.req(CALLER_API_HEADER).as_deref(), Some(api), "{path}");
    }
    // A chain is marked too (its complete answers are held by the listener
    // half, so Envoy may answer a cut one past it); a client's own mark
    // never stands.
    let cfg = config_from(ROUTED_CONFIG);
    let body = chat_body(&quote("chain"));
    let mut host = client_post("/v1/chat/completions", body.as_bytes())
        .with_header(CALLER_API_HEADER, "gemini");
    let mut router = Filter::new(Rc::clone(&cfg), Role::Router);
    router.on_request_headers(&mut host, false);
    assert_eq!(
        router.on_request_body(&mut host, body.len(), true),
        Flow::Continue
    );
    assert_eq!(host.req(CALLER_API_HEADER).as_deref(), Some("openai"));
    // One target: the listener half serves it and marks it.
    let body = chat_body(&quote("fast"));
    let mut host = client_post("/v1/chat/completions", body.as_bytes());
    let mut router = Filter::new(cfg, Role::Router);
    router.on_request_headers(&mut host, false);
    router.on_request_body(&mut host, body.len(), true);
    assert_eq!(host.req(CALLER_API_HEADER).as_deref(), Some("openai"));
}

#[test]
fn a_translated_answer_over_the_limit_is_502_in_the_callers_shape() {
    let answer = br#"{"id":"c","object":"chat.completion","created":1,"model":"gpt-4.1","choices":[{"index":0,"message":{"role":"assistant","content":"hello there, a long answer"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#;
    let limit = answer.len() - 1;
    let (mut f, mut host) = forwarded_with(limited_multi(limit), "/v1/messages", ANTHROPIC_TO_GPT);
    host.respond(
        200,
        &[("content-type", "application/json")],
        answer,
        Some("via_upstream"),
    );
    // Held: it is translated once whole.
    assert_eq!(f.on_response_headers(&mut host, false), Flow::Pause);
    assert_eq!(f.on_response_body(&mut host, 64, false), Flow::Pause);
    assert!(host.sent.is_empty());
    assert_eq!(f.on_response_body(&mut host, limit + 1, false), Flow::Pause);
    let sent = host.reply();
    assert_eq!(sent.status, 502);
    let v = sent.json();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "api_error");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("limit of {limit} bytes (max_response_bytes)")),
        "{message}"
    );
    assert_eq!(sent.header(PROVIDER_RESPONSE_HEADER), Some("openai"));
    f.on_done(&mut host);
    assert_eq!(
        requests_counted(&host).values().sum::<u64>(),
        1,
        "counted once, as a 502"
    );
    assert!(requests_counted(&host)
        .keys()
        .all(|k| k.contains("error_type=502")));

    // At the limit exactly: translated as usual.
    let (mut f, mut host) = forwarded_with(
        limited_multi(answer.len()),
        "/v1/messages",
        ANTHROPIC_TO_GPT,
    );
    host.respond(200, &[], answer, Some("via_upstream"));
    assert_eq!(f.on_response_headers(&mut host, false), Flow::Pause);
    assert_eq!(
        f.on_response_body(&mut host, answer.len(), true),
        Flow::Continue
    );
    assert!(host.sent.is_empty());
    let v: Value = serde_json::from_slice(&host.response_body).unwrap();
    assert_eq!(v["type"], "message");
}

#[test]
fn an_error_body_over_the_limit_keeps_its_status_in_the_callers_shape() {
    let (mut f, mut host) = forwarded_with(
        limited_multi(100),
        "/v1beta/models/gpt:generateContent",
        GEMINI_CALL,
    );
    let page = vec![b'x'; 150];
    host.respond(429, &[("retry-after", "3")], &page, Some("via_upstream"));
    assert_eq!(f.on_response_headers(&mut host, false), Flow::Pause);
    assert_eq!(f.on_response_body(&mut host, 150, false), Flow::Pause);
    let sent = host.reply();
    assert_eq!(sent.status, 429);
    let v = sent.json();
    assert_eq!(v["error"]["code"], 429);
    assert_eq!(v["error"]["status"], "RESOURCE_EXHAUSTED");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("error body larger than"));
    assert_eq!(sent.header("retry-after"), Some("3"));
}

#[test]
fn the_upstream_half_answers_an_oversized_reply_for_its_attempt() {
    let doc = ROUTED_CONFIG.replacen(
        "\"models\": [",
        "\"max_response_bytes\": 32, \"models\": [",
        1,
    );
    let cfg = config_from(&doc);
    let body = chat_body(&quote("chain"));
    let mut host = client_post("/v1/chat/completions", body.as_bytes());
    let mut router = Filter::new(Rc::clone(&cfg), Role::Router);
    router.on_request_headers(&mut host, false);
    router.on_request_body(&mut host, body.len(), true);
    let mut up = MockHost::new("POST", "/").with_body(body.as_bytes());
    up.request_headers = host.request_headers.clone();
    up.properties = host.properties.clone();
    up.properties
        .insert(POSITION_PROPERTY.into(), b"0".to_vec());
    let mut attempt = Filter::new(Rc::clone(&cfg), Role::Attempt);
    attempt.on_request_headers(&mut up, false);
    assert_eq!(
        attempt.on_request_body(&mut up, body.len(), true),
        Flow::Continue
    );
    up.respond(500, &[], &[b'e'; 40], Some("via_upstream"));
    assert_eq!(attempt.on_response_headers(&mut up, false), Flow::Pause);
    assert_eq!(attempt.on_response_body(&mut up, 40, true), Flow::Pause);
    let sent = up.reply();
    assert_eq!(sent.status, 500);
    assert_eq!(sent.json()["error"]["type"], "server_error");
    // The listener half passes it on as the attempt's own answer.
    assert_eq!(sent.header(ATTEMPTS_RESPONSE_HEADER), Some("1"));
}

#[test]
fn a_bodiless_error_is_left_to_envoys_retries_and_the_last_one_answered() {
    let cfg = config_from(ROUTED_CONFIG);
    let body = chat_body(&quote("chain"));
    let mut host = client_post("/v1/chat/completions", body.as_bytes());
    let mut router = Filter::new(Rc::clone(&cfg), Role::Router);
    router.on_request_headers(&mut host, false);
    router.on_request_body(&mut host, body.len(), true);
    // The upstream half passes it on, so Envoy can try the next target.
    let mut up = MockHost::new("POST", "/").with_body(body.as_bytes());
    up.request_headers = host.request_headers.clone();
    up.properties = host.properties.clone();
    up.properties
        .insert(POSITION_PROPERTY.into(), b"0".to_vec());
    let mut attempt = Filter::new(Rc::clone(&cfg), Role::Attempt);
    attempt.on_request_headers(&mut up, false);
    attempt.on_request_body(&mut up, body.len(), true);
    up.respond(503, &[("content-length", "0")], b"", Some("via_upstream"));
    assert_eq!(attempt.on_response_headers(&mut up, true), Flow::Continue);
    assert!(up.sent.is_empty());
    // The listener half answers the one that reaches it.
    host.response_headers = up.response_headers.clone();
    host.code_details = Some("via_upstream".into());
    assert_eq!(router.on_response_headers(&mut host, true), Flow::Pause);
    let sent = host.reply();
    assert_eq!(sent.status, 503);
    assert_eq!(
        sent.json()["error"]["message"],
        "Provider \"azure\" returned an error (503): no details given"
    );
    assert_eq!(sent.header(ATTEMPTS_RESPONSE_HEADER), Some("1"));
}

#[test]
fn a_provider_status_outside_http_s_error_classes_is_answered_as_502() {
    // An HTTP/1 upstream may send any three digits; found by the fuzzer
    // (`fuzz_tests.rs`), which saw a local reply with status 2000.
    for status in [600, 999, 2000] {
        // An error body over the limit.
        let (mut f, mut host) = forwarded_with(
            limited_multi(100),
            "/v1beta/models/gpt:generateContent",
            GEMINI_CALL,
        );
        host.respond(status, &[], &[b'x'; 150], Some("via_upstream"));
        assert_eq!(f.on_response_headers(&mut host, false), Flow::Pause);
        assert_eq!(f.on_response_body(&mut host, 150, false), Flow::Pause);
        let sent = host.reply();
        assert_eq!(sent.status, 502, "{status}");
        assert_eq!(sent.json()["error"]["code"], 502, "{status}");
        assert!(
            sent.text().contains(&format!("HTTP {status}")),
            "{}",
            sent.text()
        );

        // A bodiless error.
        let (mut f, mut host) =
            forwarded_with(limited_multi(100), "/v1/messages", ANTHROPIC_TO_GPT);
        host.respond(status, &[], b"", Some("via_upstream"));
        assert_eq!(f.on_response_headers(&mut host, true), Flow::Pause);
        let sent = host.reply();
        assert_eq!(sent.status, 502, "{status}");
        assert_eq!(sent.json()["type"], "error");

        // A bodiless error that reaches the listener half of a chain as
        // the upstream half left it (had it failed to set the status).
        let cfg = config_from(ROUTED_CONFIG);
        let body = chat_body(&quote("chain"));
        let mut host = client_post("/v1/chat/completions", body.as_bytes());
        let mut router = Filter::new(Rc::clone(&cfg), Role::Router);
        router.on_request_headers(&mut host, false);
        router.on_request_body(&mut host, body.len(), true);
        host.respond(
            status,
            &[(ATTEMPTS_RESPONSE_HEADER, "1")],
            b"",
            Some("via_upstream"),
        );
        assert_eq!(router.on_response_headers(&mut host, true), Flow::Pause);
        assert_eq!(host.reply().status, 502, "{status}");
    }
}

// ---------------------------------------------------------------------------
// Passed endpoints: form uploads and stored objects
// ---------------------------------------------------------------------------

const FORM: &str =
    "--b0undary\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{MODEL}\r\n\
    --b0undary\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\
    Content-Type: audio/wav\r\n\r\nRIFF mini \0 smart\r\n--b0undary--\r\n";

#[test]
fn a_form_upload_is_routed_by_its_model_field_and_keeps_its_type() {
    let body = FORM.replace("{MODEL}", "mini");
    let mut host = client_post("/v1/audio/transcriptions", body.as_bytes());
    set_header(
        &mut host.request_headers,
        "content-type",
        "multipart/form-data; boundary=b0undary",
    );
    let mut f = Filter::new(config(), Role::Standalone);
    assert_eq!(f.on_request_headers(&mut host, false), Flow::Pause);
    let flow = f.on_request_body(&mut host, body.len(), true);
    assert_eq!(
        flow,
        Flow::Continue,
        "{:?}",
        host.sent.first().map(Sent::text)
    );
    assert_eq!(
        host.req(":path").as_deref(),
        Some("/v1/audio/transcriptions")
    );
    assert_eq!(
        host.req("content-type").as_deref(),
        Some("multipart/form-data; boundary=b0undary")
    );
    let want = FORM.replace("{MODEL}", "gpt-4o-mini");
    assert_eq!(String::from_utf8_lossy(&host.request_body), want);
    assert_eq!(host.req("content-length"), Some(want.len().to_string()));
    assert_eq!(
        host.req("authorization").as_deref(),
        Some("Bearer sk-test-openai")
    );

    // Not a form, no model field, or a provider without the endpoint: 4xx.
    for (body, status, code) in [
        ("{\"model\":\"mini\"}".to_string(), 400, "invalid_form"),
        (
            FORM.replace("name=\"model\"", "name=\"language\""),
            400,
            "missing_required_parameter",
        ),
        (FORM.replace("{MODEL}", "local"), 200, ""),
        (FORM.replace("{MODEL}", "nope"), 404, "model_not_found"),
    ] {
        let mut host = client_post("/v1/audio/transcriptions", body.as_bytes());
        let mut f = Filter::new(config(), Role::Standalone);
        f.on_request_headers(&mut host, false);
        let flow = f.on_request_body(&mut host, body.len(), true);
        if status == 200 {
            assert_eq!(flow, Flow::Continue);
            continue;
        }
        let sent = host.reply();
        assert_eq!(sent.status, status, "{}", sent.text());
        assert_eq!(error_fields(&sent.body).code.as_deref(), Some(code));
    }
}

#[test]
fn an_endpoint_the_provider_lacks_is_a_clear_400() {
    let body = r#"{"model":"smart","messages":[{"role":"user","content":"hi"}]}"#;
    let (_, host, _) = post("/v1/messages/count_tokens", body.as_bytes());
    let sent = host.reply();
    assert_eq!(sent.status, 400, "{}", sent.text());
    // An Anthropic caller gets Anthropic's error shape.
    let v: Value = serde_json::from_slice(&sent.body).unwrap();
    assert_eq!(v["type"], "error");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("token counting API"),
        "{v}"
    );
}

#[test]
fn stored_object_calls_go_to_the_account_provider_unbuffered() {
    for (method, path, upstream) in [
        (
            "GET",
            "/v1/files/file-1/content",
            "/v1/files/file-1/content",
        ),
        ("DELETE", "/v1/responses/resp_1", "/v1/responses/resp_1"),
        ("POST", "/v1/batches/b1/cancel", "/v1/batches/b1/cancel"),
        ("GET", "/v1/batches?limit=2", "/v1/batches?limit=2"),
    ] {
        let mut host = MockHost::new(method, path)
            .with_header("authorization", "Bearer client-secret")
            .with_header("openai-organization", "org-client")
            .with_header(CLUSTER_HEADER, "attacker_cluster");
        let mut f = Filter::new(config(), Role::Standalone);
        // Forwarded at the headers: an upload's body streams through.
        assert_eq!(
            f.on_request_headers(&mut host, method != "POST"),
            Flow::Continue
        );
        assert!(host.sent.is_empty(), "{path}");
        assert_eq!(host.req(":path").as_deref(), Some(upstream));
        assert_eq!(host.req(":authority").as_deref(), Some("api.openai.com"));
        assert_eq!(host.req(CLUSTER_HEADER).as_deref(), Some("openai"));
        assert_eq!(
            host.req("authorization").as_deref(),
            Some("Bearer sk-test-openai")
        );
        assert_eq!(host.req("openai-organization"), None);
        assert_eq!(host.req("content-length"), None);
    }
    // PUT is not one of theirs; without an OpenAI provider, a clear 404.
    let (_, host, _) = bodiless("PUT", "/v1/files");
    assert_eq!(host.reply().status, 405);
    let only_groq = r#"{"providers":[{"name":"groq","kind":"openai_compatible",
        "base_url":"https://api.groq.com/openai/v1"}],
        "models":[{"name":"fast","provider":"groq"}]}"#;
    let mut host = MockHost::new("GET", "/v1/files");
    let mut f = Filter::new(config_from(only_groq), Role::Standalone);
    assert_eq!(f.on_request_headers(&mut host, true), Flow::Pause);
    let sent = host.reply();
    assert_eq!(sent.status, 404);
    assert!(sent.text().contains("default_provider"), "{}", sent.text());
}

// ---------------------------------------------------------------------------
// Guardrails on requests

fn guard_config() -> Rc<Config> {
    let mut doc: Value = serde_json::from_str(ROUTED_CONFIG).unwrap();
    doc["identity"] = serde_json::json!({"source": "trusted_header", "header": "x-caller"});
    doc["guardrails"] = serde_json::json!({
        "rules": [
            {"name": "pii", "pii": ["email"], "action": "redact"},
            {"name": "watch", "keywords": ["falcon"], "action": "flag"},
            {"name": "no-secrets", "secrets": true, "action": "block"},
        ],
        "default": ["pii", "no-secrets"]
    });
    doc["namespaces"] = serde_json::json!({"lab": {"guardrails": ["watch"]}});
    config_from(&doc.to_string())
}

fn guard_counts(host: &MockHost) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = host
        .counters
        .iter()
        .filter(|(k, _)| k.starts_with(crate::metrics::GUARDRAIL_DECISIONS_TOTAL))
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    out.sort();
    out
}

#[test]
fn guardrails_redact_before_the_body_leaves_and_block_in_the_callers_shape() {
    let cfg = guard_config();
    let mut host = MockHost::default();
    let body = r#"{"model": "fast", "messages": [{"role": "user", "content": "mail bob@example.com about falcon"}]}"#;
    let (_, flow) = ns_call(
        &cfg,
        Role::Standalone,
        &mut host,
        "/v1/chat/completions",
        body,
        "shop/web",
    );
    assert_eq!(
        flow,
        Flow::Continue,
        "{:?}",
        host.sent.first().map(Sent::text)
    );
    let sent: Value = serde_json::from_slice(&host.request_body).unwrap();
    assert_eq!(
        sent["messages"][0]["content"],
        "mail [REDACTED:email] about falcon"
    );
    assert_eq!(
        host.req("content-length"),
        Some(host.request_body.len().to_string())
    );
    assert_eq!(
        guard_counts(&host),
        [(
            format!(
                "{};caller_namespace=shop;caller_service=web;guardrail=pii;action=redact;stage=request",
                crate::metrics::GUARDRAIL_DECISIONS_TOTAL
            ),
            1
        )]
    );

    // A secret in an Anthropic request: 400 in Anthropic's shape, nothing sent.
    let body = ANTHROPIC_BODY
        .replace("{MODEL}", "fast")
        .replace("\"hi\"", "\"key sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv\"");
    let (_, flow) = ns_call(
        &cfg,
        Role::Standalone,
        &mut host,
        "/v1/messages",
        &body,
        "shop/web",
    );
    assert_eq!(flow, Flow::Pause);
    let reply = host.reply();
    assert_eq!(reply.status, 400);
    let v: Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(v["type"], "error");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("`no-secrets`"), "{message}");
    assert!(
        !reply.text().contains("sk-proj"),
        "the refusal never quotes the content"
    );
    assert!(
        host.request_body.is_empty()
            || !String::from_utf8_lossy(&host.request_body).contains("[REDACTED")
    );
    let log = String::from_utf8(host.properties[LOG_GUARDRAILS].clone()).unwrap();
    assert_eq!(log, "no-secrets:block:request:secret");
}

#[test]
fn a_namespace_names_its_own_guardrails() {
    let cfg = guard_config();
    let mut host = MockHost::default();
    // `lab` gets only the flagging rule: the email passes, the flag is counted.
    let body =
        r#"{"model": "fast", "messages": [{"role": "user", "content": "bob@example.com falcon"}]}"#;
    let (mut f, flow) = ns_call(
        &cfg,
        Role::Standalone,
        &mut host,
        "/v1/chat/completions",
        body,
        "lab/app",
    );
    assert_eq!(flow, Flow::Continue);
    assert!(
        String::from_utf8_lossy(&host.request_body).contains("bob@example.com")
            || host.request_body.is_empty()
    );
    f.on_done(&mut host);
    let log = String::from_utf8(host.properties[LOG_GUARDRAILS].clone()).unwrap();
    assert_eq!(log, "watch:flag:request:keyword");
    // No rules fired: no log field, no metric.
    let body = r#"{"model": "fast", "messages": [{"role": "user", "content": "hello"}]}"#;
    let mut host = MockHost::default();
    let (mut f, flow) = ns_call(
        &cfg,
        Role::Standalone,
        &mut host,
        "/v1/chat/completions",
        body,
        "shop/web",
    );
    assert_eq!(flow, Flow::Continue);
    f.on_done(&mut host);
    assert!(host.properties.contains_key(LOG_POLICY));
    assert!(!host.properties.contains_key(LOG_GUARDRAILS));
    assert!(guard_counts(&host).is_empty());
}

#[test]
fn answer_guardrails_redact_or_withhold_a_complete_answer() {
    let cfg = guard_config();
    for (answer_text, status, want) in [
        (
            "write to alice@example.org",
            200,
            "write to [REDACTED:email]",
        ),
        (
            "the key is sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv",
            400,
            "`no-secrets`",
        ),
        ("nothing to see", 200, "nothing to see"),
    ] {
        let mut host = MockHost::default();
        let body = r#"{"model": "fast", "messages": [{"role": "user", "content": "hi"}]}"#;
        let (mut f, flow) = ns_call(
            &cfg,
            Role::Standalone,
            &mut host,
            "/v1/chat/completions",
            body,
            "shop/web",
        );
        assert_eq!(flow, Flow::Continue);
        let answer = serde_json::json!({"id": "x", "object": "chat.completion", "created": 1,
            "model": "m", "choices": [{"index": 0, "finish_reason": "stop",
            "message": {"role": "assistant", "content": answer_text}}]})
        .to_string();
        host.respond(
            200,
            &[
                ("content-type", "application/json"),
                ("content-length", &answer.len().to_string()),
            ],
            answer.as_bytes(),
            Some("via_upstream"),
        );
        // Held: the answer is read whole before anything passes.
        assert_eq!(f.on_response_headers(&mut host, false), Flow::Pause);
        assert_eq!(host.resp("content-length"), None);
        let size = host.response_body.len();
        assert_eq!(f.on_response_body(&mut host, size, true), Flow::Continue);
        f.on_done(&mut host);
        assert_eq!(
            host.resp(":status"),
            Some(status.to_string()),
            "{answer_text}"
        );
        let got = String::from_utf8_lossy(&host.response_body).into_owned();
        assert!(got.contains(want), "{answer_text}: {got}");
        assert!(!got.contains("sk-proj"), "{got}");
    }
}

#[test]
fn a_streamed_answer_is_screened_as_it_flows() {
    let cfg = guard_config();
    let mut host = MockHost::default();
    let body =
        r#"{"model": "fast", "stream": true, "messages": [{"role": "user", "content": "hi"}]}"#;
    let (mut f, flow) = ns_call(
        &cfg,
        Role::Standalone,
        &mut host,
        "/v1/chat/completions",
        body,
        "shop/web",
    );
    assert_eq!(flow, Flow::Continue);
    host.respond(
        200,
        &[("content-type", "text/event-stream")],
        b"",
        Some("via_upstream"),
    );
    assert_eq!(f.on_response_headers(&mut host, false), Flow::Continue);
    let chunk = |t: &str| {
        format!(
            "data: {}\n\n",
            serde_json::json!({"id": "c", "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {"content": t}, "finish_reason": null}]})
        )
    };
    let mut sent = String::new();
    for (i, piece) in [
        "write to ali",
        "ce@example.org",
        " today, and then some more words",
    ]
    .iter()
    .enumerate()
    {
        host.response_body = chunk(piece).into_bytes();
        let size = host.response_body.len();
        assert_eq!(f.on_response_body(&mut host, size, false), Flow::Continue);
        let out = String::from_utf8_lossy(&host.response_body).into_owned();
        assert!(
            !out.contains("ali") || i == 0 && !out.contains("ce@"),
            "{out}"
        );
        assert!(!out.contains("ce@example"), "{out}");
        sent.push_str(&out);
    }
    host.response_body = b"data: [DONE]\n\n".to_vec();
    assert_eq!(f.on_response_body(&mut host, 14, true), Flow::Continue);
    sent.push_str(&String::from_utf8_lossy(&host.response_body));
    f.on_done(&mut host);
    assert!(sent.contains("[REDACTED:email]"), "{sent}");
    assert!(sent.ends_with("data: [DONE]\n\n"), "{sent}");
    let log = String::from_utf8(host.properties[LOG_GUARDRAILS].clone()).unwrap();
    assert_eq!(log, "pii:redact:response:email");
}

fn external_config(on_failure: &str, action: &str) -> Rc<Config> {
    let mut doc: Value = serde_json::from_str(ROUTED_CONFIG).unwrap();
    doc["identity"] = serde_json::json!({"source": "trusted_header", "header": "x-caller"});
    doc["guardrails"] = serde_json::json!({"rules": [
        {"name": "pii", "pii": ["email"], "action": "redact"},
        {"name": "classifier", "action": action, "external": {
            "url": "http://classifier.local:8080/v1/check", "timeout_ms": 300,
            "on_failure": on_failure}},
    ]});
    config_from(&doc.to_string())
}

fn http_answer(status: u16, body: &str) -> CalloutAnswer {
    CalloutAnswer::Http {
        status,
        headers: Vec::new(),
        body: body.as_bytes().to_vec(),
    }
}

#[test]
fn an_external_guardrail_is_asked_after_the_built_in_rules_and_its_verdict_applies() {
    let body = r#"{"model": "fast", "messages": [{"role": "user", "content": "bob@example.com says hi"}]}"#;
    for (action, answer, want) in [
        ("block", http_answer(200, r#"{"flagged": false}"#), 200),
        (
            "block",
            http_answer(200, r#"{"flagged": true, "reason": "toxic"}"#),
            400,
        ),
        ("flag", http_answer(200, r#"{"flagged": true}"#), 200),
        (
            "redact",
            http_answer(
                200,
                r#"{"flagged": true, "texts": ["fast", "user", "[masked] says hi"]}"#,
            ),
            200,
        ),
        ("redact", http_answer(200, r#"{"flagged": true}"#), 400),
    ] {
        let cfg = external_config("closed", action);
        let mut host = MockHost::default();
        let (mut f, flow) = ns_call(
            &cfg,
            Role::Standalone,
            &mut host,
            "/v1/chat/completions",
            body,
            "shop/web",
        );
        assert_eq!(flow, Flow::Pause, "waits for the classifier");
        let call = host.callouts.last().unwrap().clone();
        assert_eq!(call.cluster, "guardrail-classifier");
        assert_eq!(call.target, "/v1/check");
        assert_eq!(call.timeout_ms, 300);
        let asked: Value = serde_json::from_slice(&call.body).unwrap();
        // The built-in rule ran first: the classifier sees the redacted text.
        assert_eq!(asked["texts"][2], "[REDACTED:email] says hi");
        assert_eq!(asked["caller"]["namespace"], "shop");
        f.on_callout(&mut host, call.id, answer.clone());
        if want == 200 {
            assert_eq!(host.resumed_requests, 1, "{action} {answer:?}");
            assert!(host.sent.is_empty());
            let sent: Value = serde_json::from_slice(&host.request_body).unwrap();
            let text = sent["messages"][0]["content"].as_str().unwrap();
            let expect = if action == "redact" {
                "[masked] says hi"
            } else {
                "[REDACTED:email] says hi"
            };
            assert_eq!(text, expect);
        } else {
            assert_eq!(host.resumed_requests, 0);
            let reply = host.reply();
            assert_eq!(reply.status, 400);
            assert!(reply.text().contains("`classifier`"), "{}", reply.text());
        }
        f.on_done(&mut host);
    }
}

#[test]
fn an_external_guardrail_without_an_answer_fails_open_or_closed_as_configured() {
    let body = r#"{"model": "fast", "messages": [{"role": "user", "content": "hi"}]}"#;
    for (mode, answer, want) in [
        ("closed", CalloutAnswer::Failed("timeout".into()), 503),
        ("closed", http_answer(500, "boom"), 503),
        ("open", CalloutAnswer::Failed("timeout".into()), 200),
        ("open", http_answer(200, "not json"), 200),
    ] {
        let cfg = external_config(mode, "block");
        let mut host = MockHost::default();
        let (mut f, flow) = ns_call(
            &cfg,
            Role::Standalone,
            &mut host,
            "/v1/chat/completions",
            body,
            "shop/web",
        );
        assert_eq!(flow, Flow::Pause);
        let id = host.callouts.last().unwrap().id;
        f.on_callout(&mut host, id, answer);
        if want == 200 {
            assert_eq!(host.resumed_requests, 1);
        } else {
            let reply = host.reply();
            assert_eq!(reply.status, 503);
            assert_eq!(
                error_fields(&reply.body).code.as_deref(),
                Some("guardrail_unavailable")
            );
        }
        f.on_done(&mut host);
        let log = String::from_utf8(host.properties[LOG_GUARDRAILS].clone()).unwrap();
        assert_eq!(log, format!("classifier:fail_{mode}:request:unavailable"));
    }
}

// ---------------------------------------------------------------------------
// The response cache
// ---------------------------------------------------------------------------

fn cache_config(cache: Value) -> Rc<Config> {
    let mut doc: Value = serde_json::from_str(ROUTED_CONFIG).unwrap();
    doc["identity"] = serde_json::json!({"source": "trusted_header", "header": "x-caller"});
    doc["cache"] = cache;
    doc["namespaces"] = serde_json::json!({"lab": {"cache": false}});
    config_from(&doc.to_string())
}

const CACHED_CHAT: &str =
    r#"{"model": "fast", "temperature": 0, "messages": [{"role": "user", "content": "hi"}]}"#;

/// Sends `body` as `caller`; a forwarded request gets `answer` (a stream
/// when the content type says so). Returns the flow of the request.
fn cached_call(
    cfg: &Rc<Config>,
    host: &mut MockHost,
    path: &str,
    body: &str,
    caller: &str,
    answer: &[u8],
    content_type: &str,
) -> Flow {
    let (mut f, flow) = ns_call(cfg, Role::Standalone, host, path, body, caller);
    if flow == Flow::Continue {
        host.respond(
            200,
            &[("content-type", content_type)],
            answer,
            Some("via_upstream"),
        );
        f.on_response_headers(host, false);
        if content_type == "text/event-stream" {
            // Streamed in two chunks, as they pass.
            let cut = answer.len() / 2;
            let whole = host.response_body.clone();
            host.response_body = whole[..cut].to_vec();
            f.on_response_body(host, cut, false);
            host.response_body = whole[cut..].to_vec();
            f.on_response_body(host, whole.len() - cut, true);
        } else {
            f.on_response_body(host, answer.len(), true);
        }
    }
    f.on_done(host);
    flow
}

fn cache_counts(host: &MockHost) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = host
        .counters
        .iter()
        .filter(|(k, _)| k.starts_with("meshllm_cache_"))
        .map(|(k, v)| {
            let outcome = k
                .split(';')
                .find(|p| p.starts_with("outcome="))
                .unwrap_or("");
            let ns = k
                .split(';')
                .find(|p| p.starts_with("caller_namespace="))
                .unwrap_or("");
            (
                format!("{}:{ns}:{outcome}", k.split(';').next().unwrap_or("")),
                *v,
            )
        })
        .collect();
    out.sort();
    out
}

const OPENAI_ANSWER: &[u8] = br#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"llama-3.1-8b-instant","choices":[{"index":0,"message":{"role":"assistant","content":"hello"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;

#[test]
fn cache_answers_the_same_request_of_the_same_namespace_from_memory() {
    let cfg = cache_config(serde_json::json!({}));
    let mut host = MockHost::default();
    let path = "/v1/chat/completions";
    let json = "application/json";
    // A miss goes to the provider and is kept.
    let flow = cached_call(
        &cfg,
        &mut host,
        path,
        CACHED_CHAT,
        "shop/web",
        OPENAI_ANSWER,
        json,
    );
    assert_eq!(flow, Flow::Continue);
    assert_eq!(host.resp(CACHE_RESPONSE_HEADER).as_deref(), Some("miss"));
    assert_eq!(host.properties[LOG_CACHE], b"stored");
    // The same request, reordered and from another service of the
    // namespace: answered here, with what the provider said.
    let again = r#"{"messages": [{"content": "hi", "role": "user"}], "temperature": 0.0, "model": "fast", "user": "u2"}"#;
    let flow = cached_call(&cfg, &mut host, path, again, "shop/api", b"", json);
    assert_eq!(flow, Flow::Pause);
    let reply = host.reply();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, OPENAI_ANSWER);
    assert_eq!(reply.header(CACHE_RESPONSE_HEADER), Some("hit"));
    assert_eq!(reply.header("age"), Some("0"));
    assert_eq!(reply.header("content-type"), Some(json));
    assert_eq!(reply.header(PROVIDER_RESPONSE_HEADER), Some("groq"));
    assert_eq!(host.properties[LOG_CACHE], b"hit");
    // A hit costs no tokens.
    assert_eq!(host.properties[LOG_INPUT_TOKENS], b"0");
    // Another namespace never sees it; `lab` has the cache off.
    let flow = cached_call(
        &cfg,
        &mut host,
        path,
        CACHED_CHAT,
        "other/web",
        OPENAI_ANSWER,
        json,
    );
    assert_eq!(flow, Flow::Continue);
    let flow = cached_call(
        &cfg,
        &mut host,
        path,
        CACHED_CHAT,
        "lab/web",
        OPENAI_ANSWER,
        json,
    );
    assert_eq!(flow, Flow::Continue);
    assert_eq!(host.resp(CACHE_RESPONSE_HEADER), None);
    assert!(!host.properties.contains_key(LOG_CACHE));
    assert_eq!(
        cache_counts(&host),
        vec![
            (
                "meshllm_cache_lookups_total:caller_namespace=other:outcome=miss".into(),
                1
            ),
            (
                "meshllm_cache_lookups_total:caller_namespace=shop:outcome=hit".into(),
                1
            ),
            (
                "meshllm_cache_lookups_total:caller_namespace=shop:outcome=miss".into(),
                1
            ),
            (
                "meshllm_cache_stores_total:caller_namespace=other:".into(),
                1
            ),
            (
                "meshllm_cache_stores_total:caller_namespace=shop:".into(),
                1
            ),
        ]
    );
}

#[test]
fn cache_replays_a_stream_as_the_stream_the_first_caller_got() {
    let cfg = cache_config(serde_json::json!({}));
    let mut host = MockHost::default();
    let path = "/v1/chat/completions";
    let sse = "text/event-stream";
    let body = r#"{"model": "fast", "temperature": 0, "stream": true, "messages": [{"role": "user", "content": "hi"}]}"#;
    let stream = b"data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hel\"}}]}\n\ndata: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n";
    assert_eq!(
        cached_call(&cfg, &mut host, path, body, "shop/web", stream, sse),
        Flow::Continue
    );
    assert_eq!(host.properties[LOG_CACHE], b"stored");
    assert_eq!(
        cached_call(&cfg, &mut host, path, body, "shop/web", b"", sse),
        Flow::Pause
    );
    let reply = host.reply();
    assert_eq!(reply.header("content-type"), Some(sse));
    assert_eq!(reply.body, stream.to_vec());
    // The same request unstreamed is another answer.
    let whole = body.replace("\"stream\": true", "\"stream\": false");
    assert_eq!(
        cached_call(
            &cfg,
            &mut host,
            path,
            &whole,
            "shop/web",
            OPENAI_ANSWER,
            "application/json"
        ),
        Flow::Continue
    );
    // A stream cut before its end is not kept.
    let cut_body = body.replace("hi", "cut");
    let cut = &stream[..stream.len() - 16];
    cached_call(&cfg, &mut host, path, &cut_body, "shop/web", cut, sse);
    assert_eq!(host.properties[LOG_CACHE], b"miss");
    assert_eq!(
        cached_call(&cfg, &mut host, path, &cut_body, "shop/web", stream, sse),
        Flow::Continue
    );
}

#[test]
fn cache_honours_no_store_no_cache_sampling_errors_and_size() {
    let cfg = cache_config(serde_json::json!({"max_entry_bytes": 400}));
    let mut host = MockHost::default();
    let path = "/v1/chat/completions";
    let json = "application/json";
    // Sampled: not cached.
    let sampled = CACHED_CHAT.replace("\"temperature\": 0", "\"temperature\": 0.7");
    cached_call(
        &cfg,
        &mut host,
        path,
        &sampled,
        "shop/web",
        OPENAI_ANSWER,
        json,
    );
    assert_eq!(host.properties[LOG_CACHE], b"bypass:sampled");
    assert_eq!(host.resp(CACHE_RESPONSE_HEADER).as_deref(), Some("bypass"));
    // An error answer is not kept.
    let (mut f, flow) = ns_call(
        &cfg,
        Role::Standalone,
        &mut host,
        path,
        CACHED_CHAT,
        "shop/web",
    );
    assert_eq!(flow, Flow::Continue);
    let err = br#"{"error":{"message":"overloaded","type":"server_error"}}"#;
    host.respond(503, &[("content-type", json)], err, Some("via_upstream"));
    f.on_response_headers(&mut host, false);
    f.on_response_body(&mut host, err.len(), true);
    f.on_done(&mut host);
    assert_eq!(host.properties[LOG_CACHE], b"miss");
    // Too large to keep.
    let big = format!(
        r#"{{"id":"x","choices":[{{"message":{{"content":"{}"}}}}]}}"#,
        "a".repeat(500)
    );
    cached_call(
        &cfg,
        &mut host,
        path,
        CACHED_CHAT,
        "shop/web",
        big.as_bytes(),
        json,
    );
    assert_eq!(host.properties[LOG_CACHE], b"miss");
    // no-store: neither read nor kept.
    let flow = {
        let (mut f, flow) = ns_call_with(
            &cfg,
            Role::Standalone,
            &mut host,
            path,
            CACHED_CHAT,
            "shop/web",
            &[("cache-control", "no-store")],
        );
        answer_json(&mut f, &mut host, OPENAI_ANSWER);
        flow
    };
    assert_eq!(flow, Flow::Continue);
    assert_eq!(host.properties[LOG_CACHE], b"bypass:no-store");
    // no-cache: not read, but the fresh answer is kept ...
    let (mut f, flow) = ns_call_with(
        &cfg,
        Role::Standalone,
        &mut host,
        path,
        CACHED_CHAT,
        "shop/web",
        &[("cache-control", "no-cache")],
    );
    assert_eq!(flow, Flow::Continue);
    answer_json(&mut f, &mut host, OPENAI_ANSWER);
    assert_eq!(host.properties[LOG_CACHE], b"refresh:stored");
    // ... for the next caller.
    assert_eq!(
        cached_call(&cfg, &mut host, path, CACHED_CHAT, "shop/web", b"", json),
        Flow::Pause
    );
    assert_eq!(host.reply().body, OPENAI_ANSWER);
    // A request offering tools is a tool turn: not cached by default.
    let tools = CACHED_CHAT.replace(
        "\"temperature\"",
        "\"tools\": [{\"type\": \"function\", \"function\": {\"name\": \"f\"}}], \"temperature\"",
    );
    cached_call(
        &cfg,
        &mut host,
        path,
        &tools,
        "shop/web",
        OPENAI_ANSWER,
        json,
    );
    assert_eq!(host.properties[LOG_CACHE], b"bypass:tools");
}

fn answer_json(f: &mut Filter, host: &mut MockHost, answer: &[u8]) {
    host.respond(
        200,
        &[("content-type", "application/json")],
        answer,
        Some("via_upstream"),
    );
    f.on_response_headers(host, false);
    f.on_response_body(host, answer.len(), true);
    f.on_done(host);
}

#[test]
fn cache_keeps_a_translated_answer_in_the_callers_shape() {
    let cfg = cache_config(serde_json::json!({}));
    let mut host = MockHost::default();
    // An Anthropic caller of an OpenAI-shaped model: what is kept is the
    // translation the caller got.
    let body = r#"{"model": "fast", "max_tokens": 10, "temperature": 0, "messages": [{"role": "user", "content": "hi"}]}"#;
    let (mut f, flow) = ns_call(
        &cfg,
        Role::Standalone,
        &mut host,
        "/v1/messages",
        body,
        "shop/web",
    );
    assert_eq!(flow, Flow::Continue);
    host.respond(
        200,
        &[("content-type", "application/json")],
        OPENAI_ANSWER,
        Some("via_upstream"),
    );
    f.on_response_headers(&mut host, false);
    assert_eq!(
        f.on_response_body(&mut host, OPENAI_ANSWER.len(), true),
        Flow::Continue
    );
    f.on_done(&mut host);
    let translated = host.response_body.clone();
    assert!(String::from_utf8_lossy(&translated).contains("\"type\":\"message\""));
    assert_eq!(host.properties[LOG_CACHE], b"stored");
    let (_, flow) = ns_call(
        &cfg,
        Role::Standalone,
        &mut host,
        "/v1/messages",
        body,
        "shop/web",
    );
    assert_eq!(flow, Flow::Pause);
    assert_eq!(host.reply().body, translated);
}

#[test]
fn cache_shares_answers_through_the_store_and_never_waits_on_a_broken_one() {
    let mut doc: Value = serde_json::from_str(ROUTED_CONFIG).unwrap();
    doc["identity"] = serde_json::json!({"source": "trusted_header", "header": "x-caller"});
    doc["quotas"] = serde_json::json!({"store": {"cluster": "quota_store"}, "limits": []});
    doc["cache"] = serde_json::json!({"shared": true, "ttl_s": 30});
    let cfg = config_from(&doc.to_string());
    let path = "/v1/chat/completions";
    let call = |host: &mut MockHost, caller: &str| {
        ns_call(&cfg, Role::Standalone, host, path, CACHED_CHAT, caller)
    };
    // Proxy A misses locally, asks the store (404: not there), forwards.
    let mut a = MockHost::default();
    let (mut f, flow) = call(&mut a, "shop/web");
    assert_eq!(flow, Flow::Pause);
    let ask = a.callouts.last().unwrap().clone();
    assert_eq!(ask.cluster, "quota_store");
    assert!(ask.target.starts_with("/GET/meshllm%2Fcache%2F") && ask.target.ends_with(".txt"));
    let not_found = CalloutAnswer::Http {
        status: 404,
        headers: vec![],
        body: vec![],
    };
    f.on_callout(&mut a, ask.id, not_found);
    assert_eq!(a.resumed_requests, 1, "forwarded");
    answer_json(&mut f, &mut a, OPENAI_ANSWER);
    // Kept locally and written to the store, detached, with the TTL.
    let write = a.callouts.last().unwrap().clone();
    assert!(write.detached && write.target.starts_with("/SET/meshllm%2Fcache%2F"));
    assert!(write.target.ends_with("/EX/30"));
    // Proxy B (its own memory) finds it in the store and replays it.
    let mut b = MockHost::default();
    let (mut g, flow) = call(&mut b, "shop/api");
    assert_eq!(flow, Flow::Pause);
    let ask_b = b.callouts.last().unwrap().clone();
    assert_eq!(ask_b.target, ask.target, "one key for one request");
    // What Redis would hold: the SET's value, percent-decoded.
    let value = crate::core::url::percent_decode(write.target.split('/').nth(3).unwrap());
    let found = CalloutAnswer::Http {
        status: 200,
        headers: vec![],
        body: value,
    };
    g.on_callout(&mut b, ask_b.id, found);
    let reply = b.reply();
    assert_eq!(reply.body, OPENAI_ANSWER);
    let said: Vec<&str> = reply
        .headers
        .iter()
        .filter(|(n, _)| n == CACHE_RESPONSE_HEADER)
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(said, ["hit"]);
    g.on_done(&mut b);
    assert_eq!(b.properties[LOG_CACHE], b"hit:shared");
    // B keeps it locally: its next lookup asks nobody.
    let (_, flow) = ns_call(
        &cfg,
        Role::Standalone,
        &mut b,
        path,
        CACHED_CHAT,
        "shop/api",
    );
    assert_eq!(flow, Flow::Pause);
    assert_eq!(b.reply().header(CACHE_RESPONSE_HEADER), Some("hit"));
    assert!(b.callouts.is_empty());
    // A store that fails (timeout) or answers garbage: the request goes on.
    for answer in [
        CalloutAnswer::Failed("timeout".into()),
        CalloutAnswer::Http {
            status: 200,
            headers: vec![],
            body: b"garbage".to_vec(),
        },
    ] {
        let mut c = MockHost::default();
        let (mut h, flow) = call(&mut c, "other/x");
        assert_eq!(flow, Flow::Pause);
        let id = c.callouts.last().unwrap().id;
        h.on_callout(&mut c, id, answer);
        assert_eq!(c.resumed_requests, 1);
        assert!(c.sent.is_empty());
    }
}

#[test]
fn an_external_guardrail_reads_a_complete_answer_before_the_caller_does() {
    let mut doc: Value = serde_json::from_str(ROUTED_CONFIG).unwrap();
    doc["identity"] = serde_json::json!({"source": "trusted_header", "header": "x-caller"});
    let body = r#"{"model": "fast", "messages": [{"role": "user", "content": "hi"}]}"#;
    let answer = br#"{"id":"c","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"the secret plan"},"finish_reason":"stop"}]}"#;
    for (role, on_failure, verdict, want) in [
        (
            Role::Standalone,
            "closed",
            http_answer(200, r#"{"flagged": false}"#),
            200,
        ),
        (
            Role::Router,
            "closed",
            http_answer(200, r#"{"flagged": true}"#),
            400,
        ),
        (
            Role::Standalone,
            "closed",
            CalloutAnswer::Failed("timeout".into()),
            503,
        ),
        (
            Role::Standalone,
            "open",
            CalloutAnswer::Failed("timeout".into()),
            200,
        ),
    ] {
        doc["guardrails"] = serde_json::json!({"rules": [
            {"name": "answers", "action": "block", "on": ["response"], "external": {
                "url": "http://classifier.local:8080/v1/check", "on_failure": on_failure}},
        ]});
        let cfg = config_from(&doc.to_string());
        let mut host = MockHost::default();
        let (mut f, flow) = ns_call(
            &cfg,
            role,
            &mut host,
            "/v1/chat/completions",
            body,
            "shop/web",
        );
        assert_eq!(flow, Flow::Continue, "the request is not asked about");
        assert!(host.callouts.is_empty());
        host.respond(
            200,
            &[("content-type", "application/json")],
            answer,
            Some("via_upstream"),
        );
        assert_eq!(f.on_response_headers(&mut host, false), Flow::Pause, "held");
        assert_eq!(
            f.on_response_body(&mut host, answer.len(), true),
            Flow::Pause,
            "held while the classifier reads it"
        );
        assert!(
            !host.properties.contains_key(LOG_POLICY),
            "not finished yet"
        );
        let call = host.callouts.last().unwrap().clone();
        let asked: Value = serde_json::from_slice(&call.body).unwrap();
        assert_eq!(asked["stage"], "response");
        assert!(asked["texts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t == "the secret plan"));
        f.on_callout(&mut host, call.id, verdict.clone());
        if want == 200 {
            assert_eq!(host.resumed_responses, 1, "{verdict:?}");
            assert!(host.sent.is_empty());
            assert_eq!(host.response_body, answer.to_vec());
        } else {
            assert_eq!(host.resumed_responses, 0);
            let reply = host.reply();
            assert_eq!(reply.status, want, "{verdict:?}");
            assert!(reply.text().contains("`answers`"), "{}", reply.text());
            assert!(!reply.text().contains("secret plan"));
        }
        assert!(
            host.properties.contains_key(LOG_POLICY),
            "finished once decided"
        );
        f.on_done(&mut host);
    }
}
