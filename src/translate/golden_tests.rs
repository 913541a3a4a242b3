//! Golden translation fixtures: every case under `testdata/translate/
//! <caller>/<case>/` is translated to every provider schema and compared,
//! as JSON values, with the expected files beside it. ARCHITECTURE.md
//! ("Golden translation fixtures") says how to add a case or a provider.
//!
//! A case holds `request.json` (the caller's body in its API) and, per
//! provider schema `<p>` in [`PROVIDERS`]:
//! - `to_<p>.request.json`, the body sent upstream, or `to_<p>.error.json`
//!   (`{"status", "body"}`: the error the caller gets instead);
//! - optionally `from_<p>.response.json`, a complete provider answer
//!   (written by hand, in the provider's API), and then
//!   `from_<p>.answer.json`, what the caller gets from it (or
//!   `{"translate_error": message}` when the answer cannot be translated).
//!
//! Nothing volatile is left to compare: the only input that varies in
//! production, the `created` time answers are stamped with (and the ids
//! derived from it), is fixed at [`CREATED`] here.
//!
//! `MESHLLM_UPDATE_GOLDEN=1 cargo test --lib golden` writes the current
//! outputs as the expected files; review them with `git diff`.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::config::testing;
use crate::config::Config;
use crate::core::json::TopLevel;
use crate::core::schema::Schema;
use crate::translate::exchange::{self, Inbound};

/// The provider schemas every case is translated to: the file-name stem
/// and the model (in [`CONFIG`]) served by a provider of that schema.
const PROVIDERS: &[(&str, &str)] = &[
    ("openai", "gpt"),
    ("anthropic", "claude"),
    ("gemini", "flash"),
    ("bedrock", "nova"),
];

const CONFIG: &str = r#"{
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
  ]
}"#;

/// The `created` time translated answers are stamped with.
const CREATED: u64 = 1_700_000_000;

const UPDATE_VAR: &str = "MESHLLM_UPDATE_GOLDEN";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/translate")
}

fn caller_schema(dir_name: &str) -> Option<Schema> {
    match dir_name {
        "openai" => Some(Schema::OpenAi),
        "anthropic" => Some(Schema::Anthropic),
        "gemini" => Some(Schema::Gemini),
        _ => None,
    }
}

fn sorted_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.is_dir())
        .collect();
    dirs.sort();
    dirs
}

fn read_json(path: &Path) -> Option<Value> {
    let text = fs::read(path).ok()?;
    Some(
        serde_json::from_slice(&text)
            .unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display())),
    )
}

fn write_json(path: &Path, value: &Value) {
    let mut text = serde_json::to_string_pretty(value).unwrap();
    text.push('\n');
    fs::write(path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// Compares `actual` with the file `name` in `case` (or writes it when
/// updating); a mismatch or a missing file is added to `failures`.
struct Checker {
    update: bool,
    failures: Vec<String>,
    compared: usize,
}

impl Checker {
    fn check(&mut self, case: &Path, name: &str, actual: &Value) {
        let path = case.join(name);
        self.compared += 1;
        if self.update {
            if read_json(&path).as_ref() != Some(actual) {
                write_json(&path, actual);
            }
            return;
        }
        match read_json(&path) {
            None => self.failures.push(format!(
                "{}: missing (run with {UPDATE_VAR}=1 and review the diff)",
                path.display()
            )),
            Some(expected) if expected != *actual => self.failures.push(format!(
                "{}: differs\nexpected: {}\nactual:   {}",
                path.display(),
                serde_json::to_string(&expected).unwrap(),
                serde_json::to_string(actual).unwrap()
            )),
            Some(_) => {}
        }
    }

    /// The expected file of the other outcome must not linger.
    fn absent(&mut self, case: &Path, name: &str) {
        let path = case.join(name);
        if !path.exists() {
            return;
        }
        if self.update {
            fs::remove_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        } else {
            self.failures
                .push(format!("{}: stale, the outcome changed", path.display()));
        }
    }
}

/// The file names a case may hold.
fn known_files() -> BTreeSet<String> {
    let mut names = BTreeSet::from(["request.json".to_string()]);
    for (p, _) in PROVIDERS {
        for suffix in ["request.json", "error.json", "response.json", "answer.json"] {
            let direction = if matches!(suffix, "request.json" | "error.json") {
                "to"
            } else {
                "from"
            };
            names.insert(format!("{direction}_{p}.{suffix}"));
        }
    }
    names
}

fn run_case(config: &Config, caller: Schema, case: &Path, checker: &mut Checker) {
    let body = fs::read(case.join("request.json"))
        .unwrap_or_else(|e| panic!("{}/request.json: {e}", case.display()));
    let doc =
        TopLevel::parse(&body).unwrap_or_else(|e| panic!("{}/request.json: {e:?}", case.display()));
    let known = known_files();
    for entry in fs::read_dir(case).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            known.contains(&name),
            "{}: unknown fixture file {name}",
            case.display()
        );
    }
    for (p, model_name) in PROVIDERS {
        let route = config.route(model_name).unwrap();
        let provider = &config.providers[route.provider];
        // Gemini callers name the model and streaming in the URL; the
        // others in the body, as the filter reads them.
        let (model, model_span, stream) = if caller == Schema::Gemini {
            (model_name.to_string(), None, false)
        } else {
            let field = doc.get("model").unwrap().expect("request.json has a model");
            let stream = doc
                .get("stream")
                .unwrap()
                .and_then(|f| doc.bool_value(f))
                .unwrap_or(false);
            (
                doc.str_value(field).unwrap().into_owned(),
                Some(field.value.clone()),
                stream,
            )
        };
        let inbound = Inbound {
            caller,
            body: &body,
            doc: &doc,
            model_span,
            model: &model,
            stream,
        };
        let (request_file, error_file) =
            (format!("to_{p}.request.json"), format!("to_{p}.error.json"));
        let (response_file, answer_file) = (
            format!("from_{p}.response.json"),
            format!("from_{p}.answer.json"),
        );
        let exchange = match exchange::translate_request(&inbound, route, provider) {
            Ok((out, exchange)) => {
                let sent = out.as_deref().unwrap_or(&body);
                let sent: Value = serde_json::from_slice(sent)
                    .unwrap_or_else(|e| panic!("{}: {p} request is not JSON: {e}", case.display()));
                checker.check(case, &request_file, &sent);
                checker.absent(case, &error_file);
                exchange
            }
            Err(error) => {
                let reply: Value =
                    serde_json::from_slice(&exchange::error_body(caller, &error)).unwrap();
                checker.check(
                    case,
                    &error_file,
                    &json!({"status": error.status, "body": reply}),
                );
                checker.absent(case, &request_file);
                if case.join(&response_file).exists() {
                    checker.failures.push(format!(
                        "{}: {response_file} for a request that is refused",
                        case.display()
                    ));
                }
                checker.absent(case, &answer_file);
                continue;
            }
        };
        let Ok(response) = fs::read(case.join(&response_file)) else {
            checker.absent(case, &answer_file);
            continue;
        };
        let answer = match exchange::translate_response(&exchange, &response, CREATED) {
            Ok(out) => serde_json::from_slice(out.as_deref().unwrap_or(&response))
                .unwrap_or_else(|e| panic!("{}: {p} answer is not JSON: {e}", case.display())),
            Err(message) => json!({ "translate_error": message }),
        };
        checker.check(case, &answer_file, &answer);
    }
}

#[test]
fn golden_translations() {
    let config = testing::config(CONFIG);
    let mut checker = Checker {
        update: std::env::var(UPDATE_VAR).is_ok_and(|v| v == "1"),
        failures: Vec::new(),
        compared: 0,
    };
    let mut cases = 0;
    for caller_dir in sorted_dirs(&root()) {
        let dir_name = caller_dir.file_name().unwrap().to_string_lossy();
        let caller = caller_schema(&dir_name)
            .unwrap_or_else(|| panic!("{}: not a caller API", caller_dir.display()));
        for case in sorted_dirs(&caller_dir) {
            run_case(&config, caller, &case, &mut checker);
            cases += 1;
        }
    }
    // Guards against a walk that silently finds nothing.
    assert!(cases >= 8, "only {cases} golden cases found");
    assert!(checker.compared >= cases * PROVIDERS.len());
    assert!(
        checker.failures.is_empty(),
        "{} golden mismatches:\n{}",
        checker.failures.len(),
        checker.failures.join("\n\n")
    );
}
