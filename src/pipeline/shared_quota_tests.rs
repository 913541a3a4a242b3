//! Shared quota rules on the request path (issue 21), driven through the
//! filter against the mock host: the request pauses for the store, goes on
//! when it admits, gets the caller's 429 when it refuses, and each rule's
//! failure mode applies when the store cannot answer. Settles leave as
//! detached calls.

use std::rc::Rc;

use serde_json::{json, Value};

use crate::config::testing;
use crate::config::Config;
use crate::host::mock::{MockHost, Op};
use crate::host::CalloutAnswer;
use crate::pipeline::handoff::{CLUSTER_HEADER, FAILOVER_CLUSTER, PLAN_PROPERTY};
use crate::pipeline::{Filter, Flow, Router};
use crate::quota::store::SCRIPT_SHA1;

fn doc(limits: Value, store: Option<Value>) -> Rc<Config> {
    let mut quotas = json!({ "limits": limits });
    if let Some(s) = store {
        quotas["store"] = s;
    }
    let d = json!({
        "providers": [{"name": "openai", "kind": "openai", "api_key_env": "OPENAI_API_KEY"}],
        "models": [{"name": "gpt-4o-mini", "provider": "openai"}],
        "identity": {"source": "trusted_header", "header": "x-caller"},
        "quotas": quotas,
    });
    Rc::new(testing::config(&d.to_string()))
}

fn store() -> Option<Value> {
    Some(json!({"cluster": "quota_store", "timeout_ms": 250}))
}

fn shared_config() -> Rc<Config> {
    doc(
        json!([
            {"name": "team", "match": {"namespace": "team"}, "requests_per_day": 5,
             "tokens_per_day": 100000, "shared": true},
            {"name": "open", "match": {"namespace": "open"}, "requests_per_day": 5,
             "shared": true, "on_store_failure": "open"},
            {"name": "local", "match": {"namespace": "team"}, "requests_per_day": 3},
        ]),
        store(),
    )
}

const BODY: &str = r#"{"model": "gpt-4o-mini", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}"#;

fn request(path: &str, caller: &str) -> MockHost {
    let mut host = MockHost::new("POST", path)
        .with_header("content-type", "application/json")
        .with_header("x-caller", caller)
        .with_body(BODY.as_bytes());
    host.now_ms = 1_772_323_230_000;
    host
}

/// Runs the request callbacks; the flow of the body callback.
fn start(cfg: &Rc<Config>, host: &mut MockHost) -> (Filter, Flow) {
    let mut f = Filter::Listener(Router::new(Rc::clone(cfg), false));
    assert_eq!(f.on_request_headers(host, false), Flow::Pause);
    let flow = f.on_request_body(host, BODY.len(), true);
    (f, flow)
}

fn webdis(body: &str) -> CalloutAnswer {
    CalloutAnswer::Http {
        status: 200,
        headers: Vec::new(),
        body: body.as_bytes().to_vec(),
    }
}

fn counted(host: &MockHost, outcome: &str) -> u64 {
    host.counters
        .iter()
        .filter(|(n, _)| {
            n.starts_with("meshllm_quota_store_calls_total")
                && n.contains(&format!(";outcome={outcome}"))
        })
        .map(|(_, v)| *v)
        .sum()
}

fn local_used(host: &MockHost, cfg: &Config) -> u64 {
    let rule = cfg
        .quotas
        .as_ref()
        .unwrap()
        .rules
        .iter()
        .find(|r| r.name == "local")
        .unwrap();
    crate::quota::buckets::standings(host, "meshllm/quota/v1/local", &rule.limits, host.now_ms)[0]
        .used
}

#[test]
fn a_shared_rule_pauses_the_request_until_the_store_admits() {
    let cfg = shared_config();
    let mut host = request("/v1/chat/completions", "team/api");
    let (mut f, flow) = start(&cfg, &mut host);
    assert_eq!(flow, Flow::Pause, "waits for the store: {:?}", host.sent);
    assert!(host.sent.is_empty());
    assert_eq!(host.callouts.len(), 1);
    let call = &host.callouts[0];
    assert!(!call.detached);
    assert_eq!(call.cluster, "quota_store");
    assert_eq!(call.timeout_ms, 250);
    assert!(call.body.is_empty());
    let body = call.target.clone();
    assert!(
        body.starts_with(&format!("/EVALSHA/{SCRIPT_SHA1}/2/")),
        "{body}"
    );
    assert!(body.contains("%23requests%3Aday%3A20513/"), "{body}");
    assert_eq!(
        local_used(&host, &cfg),
        1,
        "the local rule reserved as today"
    );
    assert_eq!(host.req(":path").as_deref(), Some("/v1/chat/completions"));

    let id = call.id;
    f.on_callout(&mut host, id, webdis(r#"{"EVALSHA":[1,4,30]}"#));
    assert_eq!(host.resumed_requests, 1);
    assert!(host.sent.is_empty(), "{:?}", host.sent);
    assert_eq!(counted(&host, "ok"), 1);
    // Pointed at the provider after the pause.
    assert!(host
        .req("authorization")
        .is_some_and(|a| a.starts_with("Bearer ")));

    // The answer's headers show the tightest of local and shared: local
    // 1 of 3 requests (2 left), shared 4 of 5 (1 left).
    host.respond(
        200,
        &[("content-type", "application/json")],
        br#"{"usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}"#,
        None,
    );
    f.on_response_headers(&mut host, false);
    assert_eq!(
        host.resp("x-ratelimit-remaining-requests").as_deref(),
        Some("1")
    );
    assert_eq!(
        host.resp("x-ratelimit-limit-requests").as_deref(),
        Some("5")
    );
    let len = host.response_body.len();
    f.on_response_body(&mut host, len, true);
    f.on_done(&mut host);

    // The settle leaves detached, with actual − reserved per counter.
    let settle = host.callouts.last().unwrap().clone();
    assert!(settle.detached && settle.id != id);
    let text = settle.target;
    assert!(
        text.starts_with(&format!("/EVALSHA/{SCRIPT_SHA1}/1/")),
        "{text}"
    );
    assert!(
        text.contains("%23tokens%3Aday%3A"),
        "only tokens moved: {text}"
    );
    assert!(text.contains("/settle/%2D"), "a refund: {text}");
    assert!(host.answer_detached(settle.id, webdis(r#"{"EVALSHA":[1,12]}"#)));
    assert_eq!(counted(&host, "ok"), 2);
}

#[test]
fn a_refusal_from_the_store_is_the_callers_429_and_gives_back_local_holds() {
    let cfg = shared_config();
    for (path, caller_shape) in [
        ("/v1/chat/completions", "openai"),
        ("/v1/messages", "anthropic"),
    ] {
        let mut host = request(path, "team/api");
        if caller_shape == "anthropic" {
            host.request_body = br#"{"model": "gpt-4o-mini", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}"#.to_vec();
        }
        let (mut f, flow) = start(&cfg, &mut host);
        assert_eq!(flow, Flow::Pause);
        let id = host.callouts[0].id;
        f.on_callout(&mut host, id, webdis(r#"{"EVALSHA":[0,5,30]}"#));
        assert_eq!(host.resumed_requests, 0);
        let reply = host.reply();
        assert_eq!(reply.status, 429);
        assert_eq!(
            reply
                .header("retry-after")
                .map(|v| v.parse::<u64>().unwrap() >= 1),
            Some(true)
        );
        let err = reply.json();
        match caller_shape {
            "openai" => {
                assert_eq!(err["error"]["code"], "rate_limit_exceeded");
                assert!(err["error"]["message"].as_str().unwrap().contains("'team'"));
                assert_eq!(reply.header("x-ratelimit-remaining-requests"), Some("0"));
            }
            _ => {
                assert_eq!(err["type"], "error");
                assert_eq!(err["error"]["type"], "rate_limit_error");
            }
        }
        assert_eq!(
            local_used(&host, &cfg),
            0,
            "the local reservation went back"
        );
        assert_eq!(counted(&host, "refused"), 1);
        assert!(
            host.callouts.iter().all(|c| !c.detached),
            "nothing to settle"
        );
    }
}

#[test]
fn a_store_that_cannot_answer_fails_open_or_closed_per_rule() {
    let cfg = shared_config();
    let garbage = [
        CalloutAnswer::Failed("timeout".into()),
        CalloutAnswer::Http {
            status: 503,
            headers: Vec::new(),
            body: Vec::new(),
        },
        webdis("<html>nope</html>"),
        webdis(r#"{"EVALSHA":[1]}"#),
        webdis(r#"{"EVALSHA":[false,"ERR something"]}"#),
    ];
    for answer in garbage {
        // Closed (the store's default): 503 in the caller's shape.
        let mut host = request("/v1/chat/completions", "team/api");
        let (mut f, _) = start(&cfg, &mut host);
        let id = host.callouts[0].id;
        f.on_callout(&mut host, id, answer.clone());
        let reply = host.reply();
        assert_eq!(reply.status, 503, "{answer:?}");
        assert_eq!(reply.header("retry-after"), Some("5"));
        assert_eq!(reply.json()["error"]["code"], "quota_store_unavailable");
        assert_eq!(local_used(&host, &cfg), 0);
        assert_eq!(counted(&host, "fail_closed"), 1);

        // Open: admitted on local limits; nothing shared to settle.
        let mut host = request("/v1/chat/completions", "open/api");
        let (mut f, _) = start(&cfg, &mut host);
        let id = host.callouts[0].id;
        f.on_callout(&mut host, id, answer);
        assert!(host.sent.is_empty());
        assert_eq!(host.resumed_requests, 1);
        assert_eq!(counted(&host, "fail_open"), 1);
        host.respond(200, &[], b"{}", None);
        f.on_response_headers(&mut host, false);
        f.on_response_body(&mut host, 2, true);
        f.on_done(&mut host);
        assert_eq!(
            host.callouts.len(),
            1,
            "no settle for a reservation never made"
        );
    }
}

#[test]
fn a_dispatch_failure_is_a_store_failure_without_a_pause() {
    let cfg = shared_config();
    let mut host = request("/v1/chat/completions", "open/api");
    host.fail(&[Op::CallOut]);
    let (_, flow) = start(&cfg, &mut host);
    assert_eq!(flow, Flow::Continue, "open: goes on at once");
    assert_eq!(counted(&host, "fail_open"), 1);

    let mut host = request("/v1/chat/completions", "team/api");
    host.fail(&[Op::CallOut]);
    let (_, flow) = start(&cfg, &mut host);
    assert_eq!(flow, Flow::Pause);
    assert_eq!(host.reply().status, 503);
    assert_eq!(local_used(&host, &cfg), 0);
}

#[test]
fn a_redis_without_the_script_gets_it_whole_once() {
    let cfg = shared_config();
    let mut host = request("/v1/chat/completions", "team/api");
    let (mut f, _) = start(&cfg, &mut host);
    let id = host.callouts[0].id;
    let noscript = webdis(r#"{"EVALSHA":[false,"NOSCRIPT No matching script. Please use EVAL."]}"#);
    f.on_callout(&mut host, id, noscript);
    assert!(host.sent.is_empty());
    assert_eq!(host.callouts.len(), 2);
    let again = host.callouts[1].clone();
    assert!(again.target.starts_with("/EVAL/"));
    // An answer to the old call is not taken for the new one.
    f.on_callout(&mut host, id, webdis(r#"{"EVAL":[1,1,1]}"#));
    assert_eq!(host.resumed_requests, 0);
    f.on_callout(&mut host, again.id, webdis(r#"{"EVAL":[1,1,1]}"#));
    assert_eq!(host.resumed_requests, 1);
}

#[test]
fn a_request_abandoned_while_waiting_gives_back_its_local_holds() {
    let cfg = shared_config();
    let mut host = request("/v1/chat/completions", "team/api");
    let (mut f, _) = start(&cfg, &mut host);
    assert_eq!(local_used(&host, &cfg), 1);
    f.on_done(&mut host);
    assert_eq!(local_used(&host, &cfg), 0);
    assert!(host.callouts.iter().all(|c| !c.detached));
}

#[test]
fn requests_without_shared_rules_make_no_store_call() {
    let cfg = shared_config();
    let mut host = request("/v1/chat/completions", "other/api");
    let (mut f, flow) = start(&cfg, &mut host);
    assert_eq!(flow, Flow::Continue);
    host.respond(200, &[], b"{}", None);
    f.on_response_headers(&mut host, false);
    f.on_response_body(&mut host, 2, true);
    f.on_done(&mut host);
    assert!(host.callouts.is_empty());
    assert_eq!(host.calls.borrow().get("call_out"), None);
}

#[test]
fn shared_rules_are_refused_without_a_store_and_failure_modes_checked() {
    let err = |limits: Value, store: Option<Value>| {
        let mut d = json!({
            "providers": [{"name": "openai", "kind": "openai", "api_key_env": "OPENAI_API_KEY"}],
            "models": [{"name": "gpt-4o-mini", "provider": "openai"}],
            "identity": {"source": "trusted_header", "header": "x-caller"},
            "quotas": {"limits": limits},
        });
        if let Some(s) = store {
            d["quotas"]["store"] = s;
        }
        testing::compile_error(&d.to_string())
    };
    let e = err(
        json!([{"name": "a", "requests_per_day": 1, "shared": true}]),
        None,
    );
    assert!(e.starts_with("quotas.limits[0].shared:"), "{e}");
    let e = err(
        json!([{"name": "a", "requests_per_day": 1, "on_store_failure": "open"}]),
        store(),
    );
    assert!(e.starts_with("quotas.limits[0].on_store_failure:"), "{e}");
    let e = err(
        json!([{"name": "a", "requests_per_day": 1, "shared": true, "on_store_failure": "ajar"}]),
        store(),
    );
    assert!(e.starts_with("quotas.limits[0].on_store_failure:"), "{e}");
    let e = err(
        json!([{"name": "a", "requests_per_day": 1, "shared": "yes"}]),
        store(),
    );
    assert!(e.starts_with("quotas.limits[0].shared:"), "{e}");
    // A namespace's rule may be shared too, with the same checks.
    let mut d = json!({
        "providers": [{"name": "openai", "kind": "openai", "api_key_env": "OPENAI_API_KEY"}],
        "models": [{"name": "gpt-4o-mini", "provider": "openai"}],
        "identity": {"source": "trusted_header", "header": "x-caller"},
        "namespaces": {"shop": {"quotas": {"limits": [{"name": "n", "requests_per_day": 1, "shared": true}]}}},
    });
    let e = testing::compile_error(&d.to_string());
    assert!(
        e.starts_with("namespaces.shop.quotas.limits[0].shared:"),
        "{e}"
    );
    d["quotas"] = json!({"store": {"cluster": "q"}, "limits": []});
    let cfg = testing::config(&d.to_string());
    let rule = &cfg.namespaces["shop"].rules[0];
    assert_eq!(rule.shared, Some(crate::quota::store::FailureMode::Closed));
    // Without a store and without shared rules nothing changes.
    let cfg = doc(json!([{"name": "a", "requests_per_day": 1}]), None);
    assert!(cfg.store().is_none());
    assert_eq!(cfg.quotas.as_ref().unwrap().rules[0].shared, None);
}

#[test]
fn a_chain_goes_to_envoy_once_the_store_admits() {
    let d = json!({
        "providers": [
            {"name": "openai", "kind": "openai", "api_key_env": "OPENAI_API_KEY"},
            {"name": "groq", "kind": "openai_compatible", "base_url": "https://api.groq.com/openai/v1",
             "api_key_env": "GROQ_API_KEY"},
        ],
        "models": [
            {"name": "gpt-4o-mini", "provider": "openai"},
            {"name": "backup", "provider": "groq", "model": "llama-3.1-8b-instant"},
        ],
        "routes": [{"name": "chain", "targets": ["gpt-4o-mini", "backup"]}],
        "identity": {"source": "trusted_header", "header": "x-caller"},
        "quotas": {"limits": [
            {"name": "team", "match": {"namespace": "team"}, "requests_per_day": 5, "shared": true},
        ], "store": store()},
    });
    let cfg = Rc::new(testing::config(&d.to_string()));
    let body = BODY.replace("gpt-4o-mini", "chain");
    let mut host = request("/v1/chat/completions", "team/api").with_body(body.as_bytes());
    let mut f = Filter::Listener(Router::new(Rc::clone(&cfg), true));
    assert_eq!(f.on_request_headers(&mut host, false), Flow::Pause);
    assert_eq!(f.on_request_body(&mut host, body.len(), true), Flow::Pause);
    assert!(host.sent.is_empty(), "{:?}", host.sent);
    assert!(
        !host.properties.contains_key(PLAN_PROPERTY),
        "no plan while waiting"
    );
    let id = host.callouts[0].id;
    // A stray answer to another call changes nothing.
    f.on_callout(&mut host, id + 7, webdis(r#"{"EVALSHA":[1,1]}"#));
    assert_eq!(host.resumed_requests, 0);
    f.on_callout(&mut host, id, webdis(r#"{"EVALSHA":[1,1]}"#));
    assert_eq!(host.resumed_requests, 1);
    assert!(host.sent.is_empty(), "{:?}", host.sent);
    assert_eq!(host.req(CLUSTER_HEADER).as_deref(), Some(FAILOVER_CLUSTER));
    assert_eq!(host.req("x-meshllm-p0").as_deref(), Some("openai"));
    assert!(host.properties.contains_key(PLAN_PROPERTY));
}
