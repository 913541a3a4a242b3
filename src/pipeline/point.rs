//! Point stage, per attempt: the translated request goes to the target's
//! cluster with its authority, path and credential (the caller's removed);
//! Bedrock requests are signed (`providers/aws/sigv4.rs`). An attempt is
//! prepared by the translate stage, then this one.

use std::rc::Rc;

use super::flow::internal;
use super::state::{Attempt, Call, ClusterChoice, Place, RequestHeaders};
use super::translate::{self, Translated};
use crate::config::models::Operation;
use crate::config::providers::{AwsCredentials, Provider};
use crate::core::api_error::ApiError;
use crate::core::json::TopLevel;
use crate::core::schema::Schema;
use crate::host::{Host, HostResult};
use crate::pipeline::handoff::{self, CALLER_API_HEADER, CLUSTER_HEADER, FIRST_POSITION_CLUSTER};
use crate::providers::aws::sigv4;

/// Client headers that carry credentials or account selection; a provider
/// must never see them (the gateway's own key is used instead).
pub(super) const CLIENT_CREDENTIAL_HEADERS: &[&str] = &[
    "authorization",
    "x-api-key",
    "api-key",
    "x-goog-api-key",
    "openai-organization",
    "openai-project",
    "x-amz-security-token",
];

/// Anthropic API options a caller sends; they only mean something to Anthropic.
pub(super) const ANTHROPIC_HEADERS: &[&str] = &["anthropic-version", "anthropic-beta"];

impl Attempt {
    /// Translates the request for the target and points it there: the
    /// translate and point stages.
    pub(super) fn prepare(
        &mut self,
        host: &mut dyn Host,
        body: &[u8],
        doc: &TopLevel,
        call: &Call,
        entry_headers: Option<Vec<String>>,
    ) -> Result<(), ApiError> {
        let target = self
            .target
            .ok_or_else(|| internal("the attempt has no target".into()))?;
        let config = Rc::clone(&self.config);
        let op = self.operation;
        let translated = translate::translate(&config, self.caller, op, (body, doc), call, target)?;
        let present = match entry_headers {
            Some(names) => RequestHeaders(Some(names)),
            None => RequestHeaders::list(host),
        };
        self.point(host, &translated, body, &present)?;
        self.exchange = translated.exchange;
        Ok(())
    }

    /// The point stage.
    pub(super) fn point(
        &self,
        host: &mut dyn Host,
        translated: &Translated,
        body: &[u8],
        present: &RequestHeaders,
    ) -> Result<(), ApiError> {
        let rewrite = |e: crate::host::HostError| {
            internal(format!("could not rewrite the request headers: {e}"))
        };
        let Some(route) = self.route() else {
            return Err(internal("the attempt has no target".into()));
        };
        let provider = &self.config.providers[route.provider];
        let path = translated.path;
        let sent_body = translated.body.as_deref().unwrap_or(body);
        point_at_provider(
            host,
            present,
            provider,
            path,
            Some(sent_body.len()),
            self.place,
        )
        .map_err(rewrite)?;
        if let Place::Inline(_) = self.place {
            host.set_request_header(CALLER_API_HEADER, handoff::api_name(self.caller))
                .map_err(rewrite)?;
            // The upstream half cleared them when it started, and set them
            // again only for an Anthropic target.
            if route.schema != Schema::Anthropic {
                for name in ANTHROPIC_HEADERS {
                    if present.has(host, name) {
                        let _ = host.remove_request_header(name);
                    }
                }
            }
        }
        let form = matches!(self.operation, Operation::Passed(p) if p.is_form());
        if translated.body.is_some() && !form {
            host.set_request_header("content-type", "application/json")
                .map_err(rewrite)?;
        }
        if let Some(creds) = &provider.aws_credentials {
            sign_for_bedrock(host, provider, path, sent_body, creds)
                .map_err(|e| internal(format!("could not sign the request: {e}")))?;
        }
        if let Some(new_body) = &translated.body {
            host.replace_request_body(body.len(), new_body)
                .map_err(|e| internal(format!("could not rewrite the request body: {e}")))?;
        }
        Ok(())
    }
}

/// Points the request at `provider`: its authority, path, cluster and
/// credential, the caller's credentials removed. `body_len`: the new
/// body's length (None: the caller's body goes as it is).
pub(super) fn point_at_provider(
    host: &mut dyn Host,
    present: &RequestHeaders,
    provider: &Provider,
    path: &str,
    body_len: Option<usize>,
    place: Place,
) -> HostResult {
    for name in CLIENT_CREDENTIAL_HEADERS {
        if present.has(host, name) {
            host.remove_request_header(name)?;
        }
    }
    // Error replies and (later) usage must be readable. No accept-encoding
    // at all would allow any encoding, so ask for identity explicitly.
    host.set_request_header("accept-encoding", "identity")?;
    host.set_request_header(":authority", &provider.authority)?;
    host.set_request_header(":path", path)?;
    match place {
        Place::Inline(ClusterChoice::Provider) => {
            host.set_request_header(CLUSTER_HEADER, &provider.cluster)?
        }
        Place::Inline(ClusterChoice::FirstPosition) => {
            host.set_request_header(CLUSTER_HEADER, FIRST_POSITION_CLUSTER)?;
            host.set_request_header(&handoff::position_header(0), &provider.name)?;
        }
        // Envoy already chose the cluster and host.
        Place::Upstream => {}
    }
    if let Some((name, value)) = &provider.auth_header {
        host.set_request_header(name, value)?;
    }
    for (name, value) in &provider.extra_headers {
        host.set_request_header(name, value)?;
    }
    if let Some(len) = body_len {
        host.set_request_header("content-length", &len.to_string())?;
    }
    Ok(())
}

/// Adds the SigV4 headers Bedrock requires, over the body as sent.
fn sign_for_bedrock(
    host: &mut dyn Host,
    provider: &Provider,
    path: &str,
    body: &[u8],
    creds: &AwsCredentials,
) -> HostResult {
    let (path_only, query) = path.split_once('?').unwrap_or((path, ""));
    let credentials = sigv4::Credentials {
        access_key_id: creds.access_key_id.clone(),
        secret_access_key: creds.secret_access_key.clone(),
        session_token: creds.session_token.clone(),
    };
    let headers = sigv4::sign(
        "POST",
        path_only,
        query,
        &provider.authority,
        "application/json",
        body,
        provider.region.as_deref().unwrap_or_default(),
        "bedrock",
        &credentials,
        host.now_unix_seconds(),
    );
    for (name, value) in &headers {
        host.set_request_header(name, value)?;
    }
    Ok(())
}
