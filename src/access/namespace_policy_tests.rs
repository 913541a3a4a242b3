//! Native tests of namespace policies (see namespace_policy.rs and
//! config/namespaces.rs).

use serde_json::{json, Value};

use super::*;
use crate::config::testing::{compile_doc, compile_error, config};
use crate::host::mock::MockShared;
use crate::quota::limits::{Facts, ModelScope};

/// A mesh document with two providers' models, a model alias and a route.
fn doc() -> Value {
    json!({
        "providers": [
            {"name": "openai", "kind": "openai", "api_key_env": "OPENAI_API_KEY"},
            {"name": "anthropic", "kind": "anthropic", "api_key_env": "OPENAI_API_KEY"}
        ],
        "models": [
            {"name": "gpt-4o", "provider": "openai"},
            {"name": "gpt-4o-mini", "provider": "openai", "aliases": ["mini"]},
            {"name": "claude", "provider": "anthropic", "model": "claude-sonnet-4-5"}
        ],
        "routes": [{"name": "smart", "targets": ["gpt-4o", "claude"]}],
        "identity": {"source": "trusted_header", "header": "x-caller"}
    })
}

fn compiled(v: &Value) -> Config {
    config(&v.to_string())
}

fn with(extra: Value) -> Value {
    let mut d = doc();
    for (k, v) in extra.as_object().unwrap() {
        d[k] = v.clone();
    }
    d
}

fn caller(ns: &str, svc: &str) -> Caller {
    Caller {
        namespace: ns.into(),
        service: svc.into(),
        virtual_key: None,
    }
}

fn applied(cfg: &Config, ns: &str, svc: &str, listener: Option<&str>) -> Applied {
    apply(
        cfg,
        &mut MockShared::default(),
        Some(&caller(ns, svc)),
        listener.map(|s| s.as_bytes().to_vec()),
    )
    .unwrap_or_else(|e| panic!("{}", e.message))
}

fn allowed_names(cfg: &Config, a: &Applied) -> Vec<String> {
    a.visible(cfg).iter().map(|(n, _)| n.to_string()).collect()
}

#[test]
fn invalid_policies_name_the_field() {
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"allowed_models": ["gpt-4o", "gpt-5"]}),
            "allowed_models[1]: \"gpt-5\" is not a model, alias or route",
        ),
        (
            json!({"allowed_models": "gpt-4o"}),
            "allowed_models: must be an array",
        ),
        (
            json!({"allowed_models": [4]}),
            "allowed_models[0]: must be a public model name",
        ),
        (json!({"namespaces": []}), "namespaces: must be an object"),
        (
            json!({"namespaces": {"Shop": {}}}),
            "namespaces.Shop: \"Shop\" is not a valid namespace",
        ),
        (
            json!({"namespaces": {"shop": []}}),
            "namespaces.shop: must be an object",
        ),
        (
            json!({"namespaces": {"shop": {"allowed": []}}}),
            "namespaces.shop.allowed: unknown field",
        ),
        (
            json!({"namespaces": {"shop": {"aliases": {"mini": "gpt-4o"}}}}),
            "namespaces.shop.aliases.mini: \"mini\" is already a public name",
        ),
        (
            json!({"namespaces": {"shop": {"aliases": {"smart": "gpt-4o"}}}}),
            "namespaces.shop.aliases.smart: \"smart\" is already a public name",
        ),
        (
            json!({"namespaces": {"shop": {"aliases": {"fast": "gpt-5"}}}}),
            "namespaces.shop.aliases.fast: \"gpt-5\" is not a model, alias or route",
        ),
        (
            json!({"namespaces": {"shop": {"aliases": {"fast": 1}}}}),
            "namespaces.shop.aliases.fast: must be a public name",
        ),
        (
            json!({"namespaces": {"shop": {"aliases": {"bad name": "gpt-4o"}}}}),
            "namespaces.shop.aliases.bad name: \"bad name\" is not a valid model name",
        ),
        (
            json!({"namespaces": {"shop": {"allowed_models": ["other-alias"]}}}),
            "namespaces.shop.allowed_models[0]: \"other-alias\" is not a model",
        ),
        (
            json!({"namespaces": {"shop": {"services": {"chat": {"allowed_models": ["x"]}}}}}),
            "namespaces.shop.services.chat.allowed_models[0]: \"x\" is not a model",
        ),
        (
            json!({"namespaces": {"shop": {"services": {"chat": {}}}}}),
            "namespaces.shop.services.chat.allowed_models: is required",
        ),
        (
            json!({"namespaces": {"shop": {"services": {"chat": {"aliases": {}}}}}}),
            "namespaces.shop.services.chat.aliases: unknown field",
        ),
        (
            json!({"namespaces": {"shop": {"quotas": {"alerts": [50]}}}}),
            "namespaces.shop.quotas.alerts: unknown field",
        ),
        (
            json!({"namespaces": {"shop": {"quotas": {"limits": [
                {"name": "a", "match": {"namespace": "other"}, "requests_per_day": 1}]}}}}),
            "namespaces.shop.quotas.limits[0].match.namespace: a namespace's rules apply",
        ),
        (
            json!({"namespaces": {"shop": {"quotas": {"limits": [
                {"name": "a", "match": {"namespace": "*"}, "requests_per_day": 1}]}}}}),
            "namespaces.shop.quotas.limits[0].match.namespace",
        ),
        (
            json!({"namespaces": {"shop": {"quotas": {"limits": [{"name": "a"}]}}}}),
            "namespaces.shop.quotas.limits[0]: sets no limit",
        ),
        (
            json!({"namespaces": {"shop": {"quotas": {"limits": [
                {"name": "a", "requests_per_day": 1}, {"name": "a", "requests_per_day": 2}]}}}}),
            "namespaces.shop.quotas.limits[1].name: \"a\" is already",
        ),
        (
            json!({"namespaces": {"shop": {"quotas": {"limits": [
                {"name": "a", "match": {"model": "gpt-5"}, "requests_per_day": 1}]}}}}),
            "namespaces.shop.quotas.limits[0].match.model: \"gpt-5\" is not a configured",
        ),
    ];
    for (extra, want) in cases {
        let d = with(extra.clone());
        let got = compile_doc(&d.to_string()).err().unwrap_or_default();
        assert!(got.starts_with(want), "{extra}\n got: {got}\nwant: {want}");
    }
    // namespaces need to know callers' namespaces.
    let mut d = with(json!({"namespaces": {"shop": {}}}));
    d.as_object_mut().unwrap().remove("identity");
    let got = compile_error(&d.to_string());
    assert!(
        got.starts_with("namespaces: needs an `identity` section"),
        "{got}"
    );
}

#[test]
fn allow_lists_take_the_service_then_the_namespace_then_the_mesh() {
    let cfg = compiled(&with(json!({
        "allowed_models": ["gpt-4o-mini", "smart"],
        "namespaces": {
            "shop": {
                "allowed_models": ["gpt-4o", "fast"],
                "aliases": {"fast": "mini"},
                "services": {"batch": {"allowed_models": ["claude"]}}
            },
            "open": {"aliases": {"quick": "gpt-4o"}}
        }
    })));
    let names = |ns: &str, svc: &str| allowed_names(&cfg, &applied(&cfg, ns, svc, None));
    // Mesh: listing a model allows each of its names.
    assert_eq!(names("misc", "app"), ["gpt-4o-mini", "mini", "smart"]);
    let mesh = applied(&cfg, "misc", "app", None);
    assert_eq!(mesh.source, Source::Mesh);
    assert!(mesh.refuses(&cfg, "gpt-4o"));
    assert!(!mesh.refuses(&cfg, "mini"));
    assert!(
        !mesh.refuses(&cfg, "unknown-name"),
        "unknown names are not refused"
    );
    // Namespace: replaces the mesh list (gpt-4o is outside it); the alias
    // allows what it stands for, so every name of gpt-4o-mini is allowed.
    let shop = applied(&cfg, "shop", "chat", None);
    assert_eq!(shop.source, Source::Namespace);
    assert_eq!(
        names("shop", "chat"),
        ["gpt-4o", "gpt-4o-mini", "mini", "fast"]
    );
    assert!(shop.refuses(&cfg, "smart"));
    assert_eq!(shop.resolve("fast"), "mini");
    assert_eq!(shop.target(&cfg, "fast"), cfg.target("gpt-4o-mini"));
    // Service: replaces the namespace list.
    assert_eq!(names("shop", "batch"), ["claude"]);
    assert!(applied(&cfg, "shop", "batch", None).refuses(&cfg, "fast"));
    // A namespace without a list inherits the mesh's, plus its aliases.
    assert_eq!(names("open", "x"), ["gpt-4o-mini", "mini", "smart"]);
    assert!(applied(&cfg, "open", "x", None).refuses(&cfg, "quick"));
    // Aliases belong to their namespace only.
    assert_eq!(mesh.resolve("fast"), "fast");
    assert_eq!(mesh.target(&cfg, "fast"), None);
    // No caller: the mesh.
    let nobody = apply(&cfg, &mut MockShared::default(), None, None).unwrap();
    assert_eq!(nobody.source, Source::Mesh);
    assert!(nobody.refuses(&cfg, "gpt-4o"));
}

#[test]
fn without_lists_everything_is_allowed() {
    let cfg = compiled(&doc());
    let a = applied(&cfg, "shop", "chat", None);
    assert!(!a.restricts(&cfg));
    assert_eq!(
        allowed_names(&cfg, &a),
        ["gpt-4o", "gpt-4o-mini", "mini", "claude", "smart"]
    );
}

#[test]
fn namespace_rules_are_added_to_the_mesh_rules_with_their_own_buckets() {
    let cfg = compiled(&with(json!({
        "quotas": {"limits": [
            {"name": "burst", "match": {"namespace": "*"}, "requests_per_minute": 100}
        ]},
        "namespaces": {
            "shop": {
                "aliases": {"fast": "mini"},
                "quotas": {"limits": [
                    {"name": "burst", "requests_per_minute": 5},
                    {"name": "per-svc", "match": {"service": "*", "namespace": "shop"}, "requests_per_day": 9},
                    {"name": "fast-only", "match": {"model": "fast"}, "tokens_per_day": 10,
                     "downgrade": {"at_percent": 50, "models": {"gpt-4o": "fast"}}}
                ]}
            },
            "team": {"quotas": {"limits": [{"name": "burst", "requests_per_minute": 7}]}}
        }
    })));
    let shop = applied(&cfg, "shop", "chat", None);
    let names: Vec<&str> = shop.rules().iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["shop/burst", "shop/per-svc", "shop/fast-only"]);
    let c = caller("shop", "chat");
    let facts = |model: &'static str| Facts {
        caller: Some(&c),
        model,
        tags: &[],
    };
    let mesh_rule = &cfg.quotas.as_ref().unwrap().rules[0];
    assert_eq!(
        mesh_rule.bucket(&facts("gpt-4o")).as_deref(),
        Some("meshllm/quota/v1/burst|ns=shop")
    );
    let keys: Vec<Option<String>> = shop
        .rules()
        .iter()
        .map(|r| r.bucket(&facts("gpt-4o-mini")))
        .collect();
    assert_eq!(
        keys,
        [
            Some("meshllm/quota/v1/shop/burst".to_string()),
            Some("meshllm/quota/v1/shop/per-svc|svc=chat".to_string()),
            // An alias in `match.model` (the namespace's `fast`, standing for
            // the document alias `mini`) binds the model behind it.
            Some("meshllm/quota/v1/shop/fast-only".to_string()),
        ]
    );
    let mini = cfg.route_index("mini").unwrap();
    assert_eq!(shop.rules()[2].scope, ModelScope::Model(mini));
    // Buckets are matched by the document's names only: admission never
    // asks by an alias.
    assert_eq!(shop.rules()[2].bucket(&facts("mini")), None);
    assert_eq!(
        shop.rules()[2].downgrade.as_ref().unwrap().models["gpt-4o"],
        "mini"
    );
    // Another namespace's rule of the same name has another bucket, and
    // never matches shop's callers.
    let team = applied(&cfg, "team", "x", None);
    assert_eq!(
        team.rules()[0].static_bucket().as_deref(),
        Some("meshllm/quota/v1/team/burst")
    );
    assert_eq!(team.rules()[0].bucket(&facts("gpt-4o")), None);
    // The document's rules get their buckets at start-up.
    let mut store = MockShared::default();
    crate::quota::admission::prepare_buckets(&cfg, &mut store);
    assert!(store.values.contains_key("meshllm/quota/v1/shop/burst"));
    assert!(store.values.contains_key("meshllm/quota/v1/team/burst"));
}

#[test]
fn the_listener_policy_wins_and_is_compiled_once_per_value() {
    let cfg = compiled(&with(json!({
        "allowed_models": ["gpt-4o"],
        "namespaces": {"shop": {"allowed_models": ["claude"], "aliases": {"doc-alias": "claude"}}}
    })));
    let v1 = r#"{"allowed_models": ["fast"], "aliases": {"fast": "mini"},
                 "quotas": {"limits": [{"name": "mine", "requests_per_day": 3}]}}"#;
    let mut store = MockShared::default();
    let caller = caller("shop", "chat");
    let run = |store: &mut MockShared, value: &str| {
        apply(&cfg, store, Some(&caller), Some(value.as_bytes().to_vec()))
    };
    let a = run(&mut store, v1).unwrap();
    assert_eq!(a.source, Source::Listener);
    assert_eq!(allowed_names(&cfg, &a), ["gpt-4o-mini", "mini", "fast"]);
    // It replaces the document's entry: its aliases too.
    assert_eq!(a.target(&cfg, "doc-alias"), None);
    assert_eq!(a.rules()[0].name, "shop/mine");
    assert!(store.values.contains_key("meshllm/quota/v1/shop/mine"));
    for _ in 0..5 {
        run(&mut store, v1).unwrap();
    }
    assert_eq!(
        cfg.listener_policies.compiles(),
        1,
        "same bytes: no re-compile"
    );
    let v2 = r#"{"allowed_models": ["claude"]}"#;
    assert_eq!(
        allowed_names(&cfg, &run(&mut store, v2).unwrap()),
        ["claude"]
    );
    assert_eq!(cfg.listener_policies.compiles(), 2);
    // The old listener still serves while it drains: both stay compiled.
    run(&mut store, v1).unwrap();
    run(&mut store, v2).unwrap();
    assert_eq!(cfg.listener_policies.compiles(), 2);
    // Blank metadata is no override.
    assert_eq!(run(&mut store, "  ").unwrap().source, Source::Namespace);
    // Invalid: fails closed naming the field, compiled (and reported) once.
    let bad = r#"{"aliases": {"fast": "gpt-5"}}"#;
    for _ in 0..3 {
        let e = run(&mut store, bad).unwrap_err();
        assert_eq!((e.status, e.code), (500, Some("invalid_namespace_policy")));
        assert!(
            e.message
                .contains("meshllm.policy.aliases.fast: \"gpt-5\" is not a model"),
            "{}",
            e.message
        );
    }
    assert_eq!(cfg.listener_policies.compiles(), 3);
    assert!(!cfg.listener_policies.first_report("shop", bad.as_bytes()));
    let e = run(&mut store, "{not json").unwrap_err();
    assert!(e
        .message
        .contains("meshllm.policy: must be a string holding a JSON object"));
    let e = run(&mut store, r#"{"quotas": {"limits": [{"name": "x", "match": {"namespace": "other"}, "requests_per_day": 1}]}}"#).unwrap_err();
    assert!(
        e.message
            .contains("meshllm.policy.quotas.limits[0].match.namespace"),
        "{}",
        e.message
    );
}

#[test]
fn a_listener_policy_without_identity_fails_closed() {
    let mut d = doc();
    d.as_object_mut().unwrap().remove("identity");
    let cfg = compiled(&d);
    let e = apply(&cfg, &mut MockShared::default(), None, Some(b"{}".to_vec())).unwrap_err();
    assert_eq!(e.status, 500);
    assert!(
        e.message.contains("needs an `identity` section"),
        "{}",
        e.message
    );
    // Nothing in the metadata: the mesh.
    let a = apply(&cfg, &mut MockShared::default(), None, None).unwrap();
    assert_eq!(a.source, Source::Mesh);
}
