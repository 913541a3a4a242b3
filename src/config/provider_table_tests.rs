//! The provider table the Python tools read, `envoy/tools/providers.json`,
//! checked against (and generated from) the code that defines it.

use serde_json::Value;

use super::*;
use crate::config::{compile, Config};

/// `envoy/tools/providers.json`: every provider kind as the Python tools
/// need it (render.py's clusters and key variables), read off the Rust
/// code by compiling one provider of each kind. `cargo test` fails while
/// the file differs; `MESHLLM_UPDATE_PROVIDERS=1 cargo test --lib
/// provider_table` rewrites it.
#[test]
fn provider_table_matches_envoy_tools_providers_json() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/envoy/tools/providers.json");
    let table = serde_json::to_string_pretty(&provider_table()).unwrap() + "\n";
    if std::env::var_os("MESHLLM_UPDATE_PROVIDERS").is_some() {
        std::fs::write(path, &table).unwrap();
    }
    let file = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        file == table,
        "{path} is not what the code says; regenerate it with \
         MESHLLM_UPDATE_PROVIDERS=1 cargo test --lib provider_table"
    );
}

/// Regions whose default URL is not the kind's template (the template
/// is probed with each, so one that stops being special drops out).
const SPECIAL_REGIONS: &[&str] = &["global"];

/// Placeholders compiled into a provider and a model, and what they
/// stand for in the table.
const PLACEHOLDERS: &[(&str, &str)] = &[
    ("/BASEPATH", "{base_path}"),
    ("MODELID", "{model}"),
    ("DEPLOYMENTID", "{deployment}"),
    ("APIVERSION", "{api_version}"),
    ("PROJECTID", "{project}"),
    ("xregionx", "{region}"),
    ("KEYVALUE", "{key}"),
];

fn templated(text: &str) -> String {
    PLACEHOLDERS
        .iter()
        .fold(text.to_string(), |t, (from, to)| t.replace(from, to))
}

/// One provider of `kind` at a placeholder `base_url`, with the fields
/// the kind requires, and `extra` fields.
fn provider_doc(kind: ProviderKind, extra: Value) -> Value {
    let mut p = serde_json::json!({
        "name": "p", "kind": kind.name(), "base_url": "https://provider.invalid/BASEPATH"
    });
    match kind {
        ProviderKind::AzureOpenAi => p["api_version"] = "APIVERSION".into(),
        ProviderKind::VertexAi => {
            p["project"] = "PROJECTID".into();
            p["region"] = "xregionx".into();
        }
        ProviderKind::Bedrock => p["region"] = "xregionx".into(),
        _ => {}
    }
    if let (Some(p), Some(extra)) = (p.as_object_mut(), extra.as_object()) {
        p.extend(extra.clone());
    }
    p
}

/// Compiles `provider` with one model on it, recording which
/// environment variables the provider's credentials were read from.
fn compile_one(provider: Value, model: Value) -> (Config, Vec<String>) {
    let read = std::cell::RefCell::new(Vec::new());
    let env = |var: &str| {
        read.borrow_mut().push(var.to_string());
        Some("KEYVALUE".to_string())
    };
    let doc = serde_json::json!({"providers": [provider], "models": [model]});
    let compiled =
        compile(doc.to_string().as_bytes(), &env).unwrap_or_else(|e| panic!("{e}: {doc}"));
    (compiled.config, read.into_inner())
}

fn provider_table() -> Value {
    let mut kinds = serde_json::Map::new();
    for name in ProviderKind::NAMES.split(", ") {
        let kind = ProviderKind::parse(name).unwrap();
        let mut entry = serde_json::Map::new();
        let template = default_base_url(kind, Some("{region}"));
        let by_region: serde_json::Map<String, Value> = SPECIAL_REGIONS
            .iter()
            .filter_map(|r| {
                let url = default_base_url(kind, Some(r))?;
                let plain = template.as_ref().map(|t| t.replace("{region}", r));
                (Some(&url) != plain.as_ref()).then(|| (r.to_string(), Value::from(url)))
            })
            .collect();
        entry.insert("default_base_url".into(), template.into());
        entry.insert("default_base_url_by_region".into(), by_region.into());

        // With an API key: the header it travels in.
        let keyed = provider_doc(kind, serde_json::json!({"api_key_env": "KEYVAR"}));
        let model = serde_json::json!({"name": "m", "provider": "p", "model": "MODELID"});
        let (config, _) = compile_one(keyed, model.clone());
        let (header, value) = config.providers[0].auth_header.clone().unwrap();
        entry.insert("credential_header".into(), header.into());
        entry.insert("credential_value".into(), templated(&value).into());

        // Without one: the variables the kind reads on its own, in the
        // order it reads them, each with the field that renames it.
        let (_, read) = compile_one(provider_doc(kind, Value::Null), model.clone());
        let defaults: Vec<Value> = read
            .iter()
            .map(|var| {
                let (field, _) = AWS_ENV_DEFAULTS
                    .iter()
                    .find(|(_, default)| default == var)
                    .unwrap_or_else(|| panic!("{name} reads {var}, which no field renames"));
                serde_json::json!([field, var])
            })
            .collect();
        entry.insert("env_defaults".into(), defaults.into());

        // The paths a model's requests take, per variant of the kind.
        let variants: Vec<(&str, Value)> = match kind {
            ProviderKind::AzureOpenAi => {
                vec![("", serde_json::json!({"deployment": "DEPLOYMENTID"}))]
            }
            ProviderKind::VertexAi => vec![
                ("google", serde_json::json!({"publisher": "google"})),
                ("anthropic", serde_json::json!({"publisher": "anthropic"})),
            ],
            _ => vec![("", Value::Null)],
        };
        let mut paths = Vec::new();
        for (publisher, extra) in variants {
            let mut model = model.clone();
            if let (Some(m), Some(extra)) = (model.as_object_mut(), extra.as_object()) {
                m.extend(extra.clone());
            }
            let (config, _) = compile_one(provider_doc(kind, Value::Null), model);
            let route = &config.models[0];
            let mut row = serde_json::json!({
                "schema": route.schema,
                "chat": templated(&route.chat_path),
                "chat_stream": templated(&route.chat_stream_path),
                "embeddings": route.embeddings_path.as_deref().map(templated),
            });
            if !publisher.is_empty() {
                row["publisher"] = publisher.into();
            }
            paths.push(row);
        }
        entry.insert("paths".into(), paths.into());
        kinds.insert(name.to_string(), entry.into());
    }
    serde_json::json!({
        "about": "What each provider kind is by default, read off the Rust code \
                  (src/providers/mod.rs, src/config/providers.rs, src/config/models.rs) by \
                  MESHLLM_UPDATE_PROVIDERS=1 cargo test --lib provider_table, which also \
                  fails while this file differs. envoy/tools/render.py reads it.",
        "kinds": kinds,
    })
}
