//! Endpoint stage, listener half: which API the caller speaks and what it
//! asks for, from the path and method. `/v1/models` listings are answered
//! here.

use std::rc::Rc;

use super::flow::Flow;
use super::request::{missing_body, model_not_found};
use super::state::{Phase, Router};
use crate::config::models::Operation;
use crate::config::operations::{Account, Passed};
use crate::core::api_error::ApiError;
use crate::core::schema::Schema;
use crate::host::Host;
use crate::pipeline::handoff::CLUSTER_HEADER;
use crate::translate::exchange;

/// Model listings in the Anthropic and Gemini APIs' shapes (OpenAI's is
/// built once with the configuration). Rare requests: built per call.
mod listing {
    use serde_json::{json, Value};

    use crate::core::schema::Schema;

    pub fn entry(caller: Schema, id: &str) -> Value {
        match caller {
            Schema::Gemini => json!({
                "name": format!("models/{id}"),
                "displayName": id,
                "supportedGenerationMethods": ["generateContent", "streamGenerateContent"],
            }),
            _ => json!({
                "type": "model",
                "id": id,
                "display_name": id,
                "created_at": "1970-01-01T00:00:00Z",
            }),
        }
    }

    pub fn model(caller: Schema, id: &str) -> Vec<u8> {
        entry(caller, id).to_string().into_bytes()
    }

    pub fn models<'a>(caller: Schema, names: impl Iterator<Item = &'a str>) -> Vec<u8> {
        let names: Vec<&str> = names.collect();
        let data: Vec<Value> = names.iter().map(|n| entry(caller, n)).collect();
        let body = match caller {
            Schema::Gemini => json!({ "models": data }),
            _ => json!({
                "data": data,
                "has_more": false,
                "first_id": names.first(),
                "last_id": names.last(),
            }),
        };
        body.to_string().into_bytes()
    }
}

enum Endpoint {
    Models,
    Model(String),
    Call(Operation, Schema),
    /// Files, batches, stored responses: any of GET, POST and DELETE.
    Account(Account),
    /// `models/{model}:generateContent` or `:streamGenerateContent`.
    Gemini(String, bool),
}

impl Router {
    /// The endpoint stage: recognises the URL, answers listings, and starts
    /// an LLM call through the identify stage.
    pub(super) fn endpoint(&mut self, host: &mut dyn Host, end_of_stream: bool) -> Flow {
        self.req.started_us = host.now_unix_micros();
        // Routing is the filter's decision alone; a client cannot pick a
        // cluster, whether or not its request is one the filter handles.
        if host.request_header(CLUSTER_HEADER).is_some() {
            let _ = host.remove_request_header(CLUSTER_HEADER);
        }
        if !self.config.hosts.is_empty() {
            let authority = host.request_header(":authority").unwrap_or_default();
            if !self.config.handles_host(&authority) {
                self.phase = Phase::Bypass;
                return Flow::Continue;
            }
        }
        let method = host.request_header(":method").unwrap_or_default();
        let path = host.request_header(":path").unwrap_or_default();
        self.req.caller = caller_of_path(&path);
        let matched = match_endpoint(&path);
        self.req.path = path;
        let path = &self.req.path;
        let Some((endpoint, allowed)) = matched else {
            let shown = path.split_once('?').map_or(path.as_str(), |(p, _)| p);
            return self.reject(
                host,
                ApiError::new(
                    404,
                    "invalid_request_error",
                    Some("unknown_url"),
                    format!(
                        "Unknown request URL: {method} {shown}. This gateway serves \
                         POST /v1/chat/completions, POST /v1/responses, POST /v1/embeddings, \
                         GET /v1/models, POST /v1/messages and \
                         POST /v1beta/models/{{model}}:generateContent (and \
                         :streamGenerateContent), and passes OpenAI's completions, images, \
                         audio, moderations, files and batches and Anthropic's \
                         messages/count_tokens."
                    ),
                ),
            );
        };
        let allowed = match &endpoint {
            Endpoint::Account(_) if matches!(method.as_str(), "GET" | "POST" | "DELETE") => {
                method.as_str()
            }
            _ => allowed,
        };
        if method != allowed {
            let error = ApiError::new(
                405,
                "invalid_request_error",
                Some("method_not_allowed"),
                format!("Method {method} is not allowed on this URL; use {allowed}."),
            );
            let body = exchange::error_body(self.req.caller, &error);
            return self.reply(host, 405, &[("allow", allowed)], &body);
        }
        // The Anthropic SDK lists models on the same URL as OpenAI's, and
        // says who it is with `anthropic-version`.
        if matches!(endpoint, Endpoint::Models | Endpoint::Model(_))
            && host.request_header("anthropic-version").is_some()
        {
            self.req.caller = Schema::Anthropic;
        }
        match endpoint {
            Endpoint::Models => self.list_models(host),
            Endpoint::Model(id) => self.show_model(host, id),
            Endpoint::Call(op, caller) => {
                self.req.caller = caller;
                self.start_call(host, op, end_of_stream)
            }
            Endpoint::Account(account) => self.account_call(host, account),
            Endpoint::Gemini(model, stream) => {
                self.req.caller = Schema::Gemini;
                let query = path.split_once('?').map_or("", |(_, q)| q);
                if stream && !query.split('&').any(|p| p == "alt=sse") {
                    // Google's other streaming form is one JSON array; the
                    // gateway streams events, as every SDK asks for.
                    return self.reject(
                        host,
                        ApiError::invalid_request(
                            Some("unsupported_parameter"),
                            "This gateway streams Gemini answers as server-sent events only: \
                             add ?alt=sse to :streamGenerateContent."
                                .into(),
                        ),
                    );
                }
                self.req.gemini_call = Some((model, stream));
                self.start_call(host, Operation::ChatCompletions, end_of_stream)
            }
        }
    }

    /// An LLM call from here on (refusals are counted too): the identify
    /// stage, then the body is read.
    fn start_call(&mut self, host: &mut dyn Host, op: Operation, end_of_stream: bool) -> Flow {
        self.req.operation = Some(op);
        if let Err(e) = self.identify(host) {
            return self.reject(host, e);
        }
        if let Err(e) = self.strip_internal_headers(host) {
            return self.reject(host, e);
        }
        if end_of_stream {
            return self.reject(host, missing_body());
        }
        self.phase = Phase::ReadingBody;
        Flow::Pause
    }

    fn list_models(&mut self, host: &mut dyn Host) -> Flow {
        let config = Rc::clone(&self.config);
        let applied = match self.listing_policy(host) {
            Ok(a) => a,
            Err(e) => return self.reject(host, e),
        };
        if let Some(applied) = applied.filter(|a| a.restricts(&config)) {
            let visible = applied.visible(&config);
            let body = match self.req.caller {
                Schema::OpenAi | Schema::Converse => crate::config::models::models_list_body(
                    visible.iter().map(|(n, t)| (*n, config.owner(*t))),
                ),
                caller => listing::models(caller, visible.iter().map(|(n, _)| *n)),
            };
            return self.reply(host, 200, &[], &body);
        }
        match self.req.caller {
            Schema::OpenAi | Schema::Converse => {
                self.reply(host, 200, &[], &config.models_list_body)
            }
            caller => {
                let body = listing::models(caller, config.public_names());
                self.reply(host, 200, &[], &body)
            }
        }
    }

    fn show_model(&mut self, host: &mut dyn Host, id: String) -> Flow {
        let config = Rc::clone(&self.config);
        let id = match self.req.caller {
            Schema::Gemini => id.strip_prefix("models/").unwrap_or(&id).to_string(),
            _ => id,
        };
        let applied = match self.listing_policy(host) {
            Ok(a) => a,
            Err(e) => return self.reject(host, e),
        };
        if let Some(applied) = applied.filter(|a| a.restricts(&config)) {
            // A name the caller may not use is not shown, as if unknown.
            let body = match applied.target(&config, &id) {
                Some(t) if applied.allows(&config, t) => match self.req.caller {
                    Schema::OpenAi | Schema::Converse => {
                        crate::config::models::model_body(&id, config.owner(t))
                    }
                    caller => listing::model(caller, &id),
                },
                _ => return self.reject(host, model_not_found(&id)),
            };
            return self.reply(host, 200, &[], &body);
        }
        match (config.model_body(&id), self.req.caller) {
            (None, _) => self.reject(host, model_not_found(&id)),
            (Some(body), Schema::OpenAi | Schema::Converse) => self.reply(host, 200, &[], body),
            (Some(_), caller) => {
                let body = listing::model(caller, &id);
                self.reply(host, 200, &[], &body)
            }
        }
    }
}

fn match_endpoint(path: &str) -> Option<(Endpoint, &'static str)> {
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    let path = path.strip_suffix('/').unwrap_or(path);
    match path {
        "/v1/chat/completions" => Some((
            Endpoint::Call(Operation::ChatCompletions, Schema::OpenAi),
            "POST",
        )),
        "/v1/embeddings" => Some((
            Endpoint::Call(Operation::Embeddings, Schema::OpenAi),
            "POST",
        )),
        "/v1/messages" => Some((
            Endpoint::Call(Operation::ChatCompletions, Schema::Anthropic),
            "POST",
        )),
        "/v1/responses" => Some((
            Endpoint::Call(Operation::ChatCompletions, Schema::Responses),
            "POST",
        )),
        "/v1/models" | "/v1beta/models" => Some((Endpoint::Models, "GET")),
        _ if Passed::from_path(path).is_some() => {
            let p = Passed::from_path(path)?;
            Some((Endpoint::Call(Operation::Passed(p), p.caller()), "POST"))
        }
        _ if Account::of_path(path).is_some() => {
            Some((Endpoint::Account(Account::of_path(path)?), "GET"))
        }
        _ => {
            let rest = path
                .strip_prefix("/v1beta/models/")
                .or_else(|| path.strip_prefix("/v1/models/"))?;
            let gemini = rest
                .rsplit_once(':')
                .and_then(|(model, method)| match method {
                    "generateContent" => Some((model, false)),
                    "streamGenerateContent" => Some((model, true)),
                    _ => None,
                });
            if let Some((model, stream)) = gemini {
                let model = percent_decode(model)?;
                return (!model.is_empty()).then_some((Endpoint::Gemini(model, stream), "POST"));
            }
            if path.starts_with("/v1beta/") {
                let id = percent_decode(rest)?;
                return (!id.is_empty() && !id.contains(':'))
                    .then_some((Endpoint::Model(id), "GET"));
            }
            let id = percent_decode(rest)?;
            (!id.is_empty()).then_some((Endpoint::Model(id), "GET"))
        }
    }
}

/// The caller's API as far as the URL tells, for errors raised before the
/// endpoint is known.
fn caller_of_path(path: &str) -> Schema {
    if path.starts_with("/v1beta/")
        || path.contains(":generateContent")
        || path.contains(":streamGenerateContent")
    {
        Schema::Gemini
    } else if path.starts_with("/v1/messages") {
        Schema::Anthropic
    } else if path.starts_with("/v1/responses") {
        Schema::Responses
    } else {
        Schema::OpenAi
    }
}

/// Decodes `%XX` escapes (SDKs encode the `/` of ids like `org/model`).
/// None when an escape is malformed or the result is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    if !s.contains('%') {
        return Some(s.to_string());
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}
