//! Leased shared rules on the request path (issue 21), driven through the
//! filter against the mock host: the first request asks the store for its
//! amount and a lease, the next ones are admitted from the lease in shared
//! data without a call, one elected worker refills below the low-water
//! mark, an exhausted lease whose store grants nothing is the caller's 429,
//! and the store failing applies each rule's failure mode.

use std::rc::Rc;

use serde_json::{json, Value};

use crate::config::testing;
use crate::config::Config;
use crate::host::mock::MockHost;
use crate::host::CalloutAnswer;
use crate::pipeline::{Filter, Flow, Router};
use crate::quota::lease;

const BODY: &str = r#"{"model": "gpt-4o-mini", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}"#;

fn lease_config(limits: Value) -> Rc<Config> {
    let d = json!({
        "providers": [{"name": "openai", "kind": "openai", "api_key_env": "OPENAI_API_KEY"}],
        "models": [{"name": "gpt-4o-mini", "provider": "openai"}],
        "identity": {"source": "trusted_header", "header": "x-caller"},
        "quotas": {"limits": limits, "store": {"cluster": "quota_store", "timeout_ms": 250}},
    });
    Rc::new(testing::config(&d.to_string()))
}

fn team_config() -> Rc<Config> {
    lease_config(json!([
        {"name": "team", "match": {"namespace": "team"}, "requests_per_day": 100,
         "tokens_per_day": 100000, "shared": true,
         "lease": {"proxies": 2, "requests": 10, "tokens": 5000}},
    ]))
}

fn request(caller: &str) -> MockHost {
    let mut host = MockHost::new("POST", "/v1/chat/completions")
        .with_header("content-type", "application/json")
        .with_header("x-caller", caller)
        .with_body(BODY.as_bytes());
    host.now_ms = 1_772_323_230_000;
    host
}

/// The next request on the same proxy: shared data, outstanding detached
/// calls, the calls made and the counters carry over.
fn next(prev: &mut MockHost, caller: &str) -> MockHost {
    let mut host = request(caller);
    host.now_ms = prev.now_ms;
    host.shared = std::mem::take(&mut prev.shared);
    host.detached = std::mem::take(&mut prev.detached);
    host.callouts = std::mem::take(&mut prev.callouts);
    host.counters = std::mem::take(&mut prev.counters);
    host
}

fn start(cfg: &Rc<Config>, host: &mut MockHost) -> (Filter, Flow) {
    let mut f = Filter::Listener(Router::new(Rc::clone(cfg), false));
    assert_eq!(f.on_request_headers(host, false), Flow::Pause);
    let flow = f.on_request_body(host, BODY.len(), true);
    (f, flow)
}

/// The provider answers with 7 tokens used; the request ends.
fn finish(f: &mut Filter, host: &mut MockHost) {
    host.respond(
        200,
        &[("content-type", "application/json")],
        br#"{"usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}"#,
        None,
    );
    f.on_response_headers(host, false);
    let len = host.response_body.len();
    f.on_response_body(host, len, true);
    f.on_done(host);
}

fn webdis(body: &str) -> CalloutAnswer {
    CalloutAnswer::Http {
        status: 200,
        headers: Vec::new(),
        body: body.as_bytes().to_vec(),
    }
}

/// The webdis command's parts, decoded.
fn args(target: &str) -> Vec<String> {
    target
        .trim_start_matches('/')
        .split('/')
        .map(|part| {
            let bytes = part.as_bytes();
            let mut out = Vec::new();
            let mut i = 0;
            while i < bytes.len() {
                if bytes[i] == b'%' && i + 2 < bytes.len() {
                    let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                    out.push(u8::from_str_radix(hex, 16).unwrap());
                    i += 3;
                } else {
                    out.push(bytes[i]);
                    i += 1;
                }
            }
            String::from_utf8(out).unwrap()
        })
        .collect()
}

fn counted(host: &MockHost, kind: &str, outcome: &str) -> u64 {
    let name = crate::metrics::labelled(
        crate::metrics::QUOTA_STORE_CALLS_TOTAL,
        &[("kind", kind), ("outcome", outcome)],
    );
    host.counters.get(&name).copied().unwrap_or(0)
}

const TEAM: &str = "meshllm/quota/v1/team";

#[test]
fn a_leased_rule_asks_once_then_admits_from_its_lease_and_refills_once() {
    let cfg = team_config();
    let mut host = request("team/api");
    let (mut f, flow) = start(&cfg, &mut host);
    assert_eq!(flow, Flow::Pause, "an empty lease: the request asks");
    let call = host.callouts[0].clone();
    assert!(!call.detached);
    let a = args(&call.target);
    // EVALSHA sha 2 k1 k2 lease | max amount expire extra divisor (x2)
    assert_eq!(
        (a[0].as_str(), a[2].as_str(), a[5].as_str()),
        ("EVALSHA", "2", "lease")
    );
    assert!(a[3].ends_with("#requests:day:20513"), "{a:?}");
    assert_eq!(
        (&a[6][..], &a[7][..], &a[9][..], &a[10][..]),
        ("100", "1", "10", "4")
    );
    let estimate: u64 = a[12].parse().unwrap();
    assert!(estimate > 10);
    assert_eq!(
        (&a[11][..], &a[14][..], &a[15][..]),
        ("100000", "5000", "4")
    );
    let answer = format!(r#"{{"EVALSHA":[1,11,{},10,5000]}}"#, estimate + 5000);
    f.on_callout(&mut host, call.id, webdis(&answer));
    assert_eq!(host.resumed_requests, 1);
    assert!(host.sent.is_empty(), "{:?}", host.sent);
    assert_eq!(counted(&host, "lease", "ok"), 1);
    assert_eq!(
        host.root_wake_ms,
        Some(lease::IDLE_CHECK_MS),
        "the idle check is armed"
    );
    finish(&mut f, &mut host);
    assert_eq!(host.callouts.len(), 1, "settled in the lease, no call");
    assert_eq!(
        lease::view(&host, TEAM),
        (vec![(11, 1), (estimate + 5000, 7)], 0)
    );

    // Requests 2 to 6: from the lease, no call, no pause.
    let mut prev = host;
    for i in 2..=6 {
        let mut host = next(&mut prev, "team/api");
        let (mut f, flow) = start(&cfg, &mut host);
        assert_eq!(flow, Flow::Continue, "request {i}");
        finish(&mut f, &mut host);
        assert_eq!(host.callouts.len(), 1, "request {i} made no call");
        assert_eq!(
            host.resp("x-ratelimit-limit-requests").as_deref(),
            Some("100")
        );
        prev = host;
    }
    // Request 7 leaves 4 of 11: below half a lease, it is elected and
    // asks in a detached call for what tops the lease up to its size (6
    // requests; 42 tokens, the 6 requests' usage); it does not wait.
    let mut host = next(&mut prev, "team/api");
    let (mut f, flow) = start(&cfg, &mut host);
    assert_eq!(flow, Flow::Continue);
    let refill = host.callouts.last().unwrap().clone();
    assert!(refill.detached && host.callouts.len() == 2);
    let a = args(&refill.target);
    assert_eq!(a[5], "lease");
    assert_eq!((&a[7][..], &a[9][..]), ("0", "6"), "no request amount");
    assert_eq!((&a[12][..], &a[14][..]), ("0", "42"));
    finish(&mut f, &mut host);
    // Request 8: the election is held, no second refill.
    let mut host8 = next(&mut host, "team/api");
    let (mut f, flow) = start(&cfg, &mut host8);
    assert_eq!(flow, Flow::Continue);
    assert_eq!(host8.callouts.len(), 2);
    finish(&mut f, &mut host8);
    // The refill lands in the root context: the lease grows, the
    // election ends.
    assert!(host8.answer_detached(refill.id, webdis(r#"{"EVALSHA":[1,17,20000,6,42]}"#)));
    assert_eq!(lease::view(&host8, TEAM).0[0], (17, 8));
    assert_eq!(lease::view(&host8, TEAM).1, 0);
    assert_eq!(counted(&host8, "lease", "ok"), 2);
    assert_eq!(
        host8.counters.get("meshllm_quota_lease_admissions_total"),
        Some(&7)
    );
    let granted = crate::metrics::labelled(
        crate::metrics::QUOTA_LEASE_UNITS_TOTAL,
        &[("kind", "requests"), ("outcome", "granted")],
    );
    assert_eq!(host8.counters.get(&granted), Some(&16));

    // Idle: the unused part goes back in one detached settle.
    let store = cfg.store().unwrap();
    host8.now_ms += lease::IDLE_MS;
    assert!(!lease::return_idle(&mut host8, store));
    let back = host8.callouts.last().unwrap().clone();
    assert!(back.detached);
    let a = args(&back.target);
    assert_eq!(a[5], "settle");
    assert_eq!(a[6], "-9", "17 leased, 8 used: {a:?}");
    assert!(host8.answer_detached(back.id, webdis(r#"{"EVALSHA":[1,8,100]}"#)));
    assert_eq!(counted(&host8, "return", "ok"), 1);
    assert_eq!(lease::view(&host8, TEAM).0[0], (8, 8));
}

#[test]
fn an_exhausted_lease_whose_store_grants_nothing_is_the_callers_429() {
    let cfg = lease_config(json!([
        {"name": "small", "match": {"namespace": "team"}, "requests_per_day": 3,
         "shared": true, "lease": {"proxies": 1, "requests": 10}},
    ]));
    let mut host = request("team/api");
    let (mut f, _) = start(&cfg, &mut host);
    let id = host.callouts[0].id;
    // The store grants what fits: 1 for the request, (3 − 1) / 2 leased.
    f.on_callout(&mut host, id, webdis(r#"{"EVALSHA":[1,2,1]}"#));
    assert_eq!(host.resumed_requests, 1);
    finish(&mut f, &mut host);

    let mut host2 = next(&mut host, "team/api");
    let (mut f2, flow) = start(&cfg, &mut host2);
    assert_eq!(flow, Flow::Continue, "the leased unit");
    let refill = host2.callouts.last().unwrap().clone();
    assert!(refill.detached, "elected: the lease is empty now");
    finish(&mut f2, &mut host2);

    let mut host3 = next(&mut host2, "team/api");
    let (mut f3, flow) = start(&cfg, &mut host3);
    assert_eq!(flow, Flow::Pause, "short: the request asks itself");
    let ask = host3.callouts.last().unwrap().clone();
    assert!(!ask.detached);
    let a = args(&ask.target);
    assert_eq!(
        (&a[4][..], &a[6][..], &a[8][..]),
        ("lease", "1", "0"),
        "no extra: not elected"
    );
    f3.on_callout(&mut host3, ask.id, webdis(r#"{"EVALSHA":[0,3,0]}"#));
    let reply = host3.reply();
    assert_eq!(reply.status, 429);
    assert_eq!(reply.json()["error"]["code"], "rate_limit_exceeded");
    assert!(reply.header("retry-after").is_some());
    assert_eq!(reply.header("x-ratelimit-remaining-requests"), Some("0"));
    assert_eq!(counted(&host3, "lease", "refused"), 1);
    // For a moment the proxy refuses what cannot fit the store's count
    // itself, without a call; then it asks again.
    let calls = host3.callouts.len();
    let mut host4 = next(&mut host3, "team/api");
    let (_f4, _) = start(&cfg, &mut host4);
    assert_eq!(host4.reply().status, 429);
    assert_eq!(host4.reply().json()["error"]["code"], "rate_limit_exceeded");
    assert_eq!(
        host4.reply().header("x-ratelimit-remaining-requests"),
        Some("0")
    );
    assert_eq!(host4.callouts.len(), calls, "no call");
    let mut host5 = next(&mut host4, "team/api");
    host5.now_ms += lease::FULL_HOLD_MS;
    let (_f5, flow) = start(&cfg, &mut host5);
    assert_eq!(flow, Flow::Pause, "asks the store again");
    assert_eq!(host5.callouts.len(), calls + 1);
    let mut host3 = host5;
    // The refill finds nothing either; the election ends.
    assert!(host3.answer_detached(refill.id, webdis(r#"{"EVALSHA":[1,3,0]}"#)));
    let bucket = "meshllm/quota/v1/small";
    assert_eq!(lease::view(&host3, bucket), (vec![(2, 2)], 0));
}

#[test]
fn a_store_failure_while_leasing_follows_each_rules_failure_mode() {
    let cfg = lease_config(json!([
        {"name": "closed", "match": {"namespace": "closed"}, "requests_per_day": 100,
         "shared": true, "lease": {"proxies": 2}},
        {"name": "open", "match": {"namespace": "open"}, "requests_per_day": 100,
         "shared": true, "on_store_failure": "open", "lease": {"proxies": 2}},
    ]));
    let mut host = request("closed/api");
    let (mut f, _) = start(&cfg, &mut host);
    let id = host.callouts[0].id;
    f.on_callout(&mut host, id, CalloutAnswer::Failed("timeout".into()));
    let reply = host.reply();
    assert_eq!(reply.status, 503);
    assert_eq!(reply.json()["error"]["code"], "quota_store_unavailable");
    assert_eq!(counted(&host, "lease", "fail_closed"), 1);
    assert_eq!(
        lease::view(&host, "meshllm/quota/v1/closed").1,
        0,
        "the election ends with the call"
    );

    let mut host = request("open/api");
    let (mut f, _) = start(&cfg, &mut host);
    let id = host.callouts[0].id;
    f.on_callout(&mut host, id, CalloutAnswer::Failed("timeout".into()));
    assert!(host.sent.is_empty());
    assert_eq!(host.resumed_requests, 1);
    assert_eq!(counted(&host, "lease", "fail_open"), 1);
    finish(&mut f, &mut host);
    assert_eq!(host.callouts.len(), 1, "nothing leased, nothing to settle");

    // A refill that fails ends the election, so the next low take may ask.
    let mut host = request("open/api");
    let (mut f, _) = start(&cfg, &mut host);
    let id = host.callouts[0].id;
    // Default size: 100 / (10 × 2) = 5 requests; 1 for the request.
    assert_eq!(args(&host.callouts[0].target)[8], "5");
    f.on_callout(&mut host, id, webdis(r#"{"EVALSHA":[1,6,5]}"#));
    finish(&mut f, &mut host);
    // Takes 2 to 4 leave 2 or more (half a lease): no refill; take 5
    // leaves 1 and is elected.
    let mut prev = host;
    for i in 2..=5 {
        let mut host = next(&mut prev, "open/api");
        let (mut f, flow) = start(&cfg, &mut host);
        assert_eq!(flow, Flow::Continue);
        assert_eq!(host.callouts.len(), if i < 5 { 1 } else { 2 }, "take {i}");
        finish(&mut f, &mut host);
        prev = host;
    }
    let refill = prev.callouts.last().unwrap().clone();
    assert!(refill.detached);
    assert!(prev.answer_detached(refill.id, CalloutAnswer::Failed("reset".into())));
    assert_eq!(counted(&prev, "lease", "failed"), 1);
    assert_eq!(
        lease::view(&prev, "meshllm/quota/v1/open"),
        (vec![(6, 5)], 0)
    );
}

#[test]
fn a_request_abandoned_while_asking_ends_its_election() {
    let cfg = team_config();
    let mut host = request("team/api");
    let (mut f, flow) = start(&cfg, &mut host);
    assert_eq!(flow, Flow::Pause);
    assert_eq!(lease::view(&host, TEAM).1, host.now_ms, "elected");
    f.on_done(&mut host);
    assert_eq!(lease::view(&host, TEAM), (Vec::new(), 0));
}

#[test]
fn a_lease_needs_a_shared_rule_and_is_checked_with_its_path() {
    let err = |rule: Value| {
        let d = json!({
            "providers": [{"name": "openai", "kind": "openai", "api_key_env": "OPENAI_API_KEY"}],
            "models": [{"name": "gpt-4o-mini", "provider": "openai"}],
            "quotas": {"limits": [rule], "store": {"cluster": "quota_store"}},
        });
        testing::compile_error(&d.to_string())
    };
    let e = err(json!({"name": "a", "requests_per_day": 1, "lease": {"proxies": 2}}));
    assert!(e.starts_with("quotas.limits[0].lease:"), "{e}");
    let e = err(
        json!({"name": "a", "requests_per_day": 1, "shared": true, "lease": {"proxies": 2, "tokens": 5}}),
    );
    assert!(e.starts_with("quotas.limits[0].lease.tokens:"), "{e}");
    let e = err(json!({"name": "a", "requests_per_day": 1, "shared": true, "lease": {}}));
    assert!(e.starts_with("quotas.limits[0].lease.proxies:"), "{e}");
    // Exact stays the default.
    let cfg = lease_config(json!([{"name": "a", "requests_per_day": 1, "shared": true}]));
    assert_eq!(cfg.quotas.as_ref().unwrap().rules[0].lease, None);
}

#[test]
fn a_request_under_a_leased_and_an_exact_rule_asks_only_for_the_exact_one_once_leased() {
    let cfg = lease_config(json!([
        {"name": "team", "match": {"namespace": "team"}, "requests_per_day": 100,
         "shared": true, "lease": {"proxies": 2, "requests": 10}},
        {"name": "exact", "match": {"namespace": "team"}, "requests_per_day": 50, "shared": true},
    ]));
    let mut host = request("team/api");
    let (mut f, flow) = start(&cfg, &mut host);
    assert_eq!(flow, Flow::Pause);
    let call = host.callouts[0].clone();
    let a = args(&call.target);
    // One lease call over both: the exact counter asks no extra.
    assert_eq!((&a[2][..], &a[5][..]), ("2", "lease"));
    assert_eq!((&a[9][..], &a[10][..]), ("10", "4"));
    assert_eq!((&a[12][..], &a[14][..], &a[15][..]), ("1", "0", "1"));
    f.on_callout(&mut host, call.id, webdis(r#"{"EVALSHA":[1,11,1,10,0]}"#));
    assert_eq!(host.resumed_requests, 1);
    finish(&mut f, &mut host);
    assert_eq!(host.callouts.len(), 1, "nothing to settle");
    assert_eq!(lease::view(&host, TEAM).0, vec![(11, 1)]);

    // Next: the lease covers `team`; `exact` is reserved as in exact mode,
    // and its refusal gives the lease back.
    let mut host2 = next(&mut host, "team/api");
    let (mut f2, flow) = start(&cfg, &mut host2);
    assert_eq!(flow, Flow::Pause);
    let call = host2.callouts.last().unwrap().clone();
    let a = args(&call.target);
    assert_eq!((&a[2][..], &a[4][..]), ("1", "reserve"), "{a:?}");
    assert!(a[3].starts_with("meshllm/quota/v1/exact#"));
    f2.on_callout(&mut host2, call.id, webdis(r#"{"EVALSHA":[0,50]}"#));
    let reply = host2.reply();
    assert_eq!(reply.status, 429);
    assert!(reply.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("'exact'"));
    assert_eq!(lease::view(&host2, TEAM).0, vec![(11, 1)]);
}

#[test]
fn a_store_wide_lease_applies_to_shared_rules_that_set_none() {
    let compile = |store: Value| {
        let d = json!({
            "providers": [{"name": "openai", "kind": "openai", "api_key_env": "OPENAI_API_KEY"}],
            "models": [{"name": "gpt-4o-mini", "provider": "openai"}],
            "quotas": {"store": store, "limits": [
                {"name": "a", "requests_per_day": 300, "shared": true},
                {"name": "b", "requests_per_day": 300, "shared": true, "lease": false},
                {"name": "c", "requests_per_day": 300, "shared": true,
                 "lease": {"proxies": 2, "requests": 7}},
                {"name": "d", "requests_per_day": 300},
            ]},
        });
        testing::compile_doc(&d.to_string())
    };
    let cfg = compile(json!({"cluster": "q", "lease": {"proxies": 3}}))
        .unwrap()
        .config;
    let rules = &cfg.quotas.as_ref().unwrap().rules;
    let lease = |i: usize| rules[i].lease.clone().map(|l| (l.proxies, l.sizes));
    assert_eq!(lease(0), Some((3, vec![10])), "300 / (10 × 3)");
    assert_eq!(lease(1), None, "lease: false stays exact");
    assert_eq!(lease(2), Some((2, vec![7])), "a rule's own lease wins");
    assert_eq!(lease(3), None, "local rules do not lease");
    for (store, path) in [
        (
            json!({"cluster": "q", "lease": {"proxies": 0}}),
            "quotas.store.lease.proxies",
        ),
        (
            json!({"cluster": "q", "lease": {"requests": 5}}),
            "quotas.store.lease",
        ),
    ] {
        let e = compile(store).err().unwrap();
        assert!(e.starts_with(&format!("{path}:")), "{e}");
    }
}
