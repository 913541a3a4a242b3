//! Calls on a provider account's stored objects (`/v1/files`,
//! `/v1/batches`, `/v1/responses/{id}`), listener half. They name no model,
//! so they go to the configured account provider (`default_provider`) with
//! its key, and their bodies (uploads of any size) stream through untouched:
//! nothing is buffered or translated. Counted in metrics and the access log
//! like every call; quotas, which are about models and tokens, do not apply.

use super::flow::{internal, Flow};
use super::point::point_at_provider;
use super::state::{ClusterChoice, Phase, Place, Router};
use crate::config::operations::{Account, Operation};
use crate::config::providers::Provider;
use crate::core::api_error::ApiError;
use crate::host::Host;
use crate::pipeline::handoff::PROVIDER_RESPONSE_HEADER;
use crate::providers::ProviderKind;

impl Router {
    /// Sends a stored-object call to the account provider.
    pub(super) fn account_call(&mut self, host: &mut dyn Host, account: Account) -> Flow {
        self.req.operation = Some(Operation::Account(account));
        if let Err(e) = self.identify(host) {
            return self.reject(host, e);
        }
        if let Err(e) = self.strip_internal_headers(host) {
            return self.reject(host, e);
        }
        let config = std::rc::Rc::clone(&self.config);
        let Some((index, provider)) = config
            .account_provider
            .and_then(|i| Some((i, config.providers.get(i)?)))
        else {
            return self.reject(host, no_account_provider(&self.req.path));
        };
        self.req.account_provider = Some(index);
        // The answer names its provider, as every forwarded call's does.
        self.req
            .answer_headers
            .push((PROVIDER_RESPONSE_HEADER.into(), provider.name.clone()));
        if provider.key_missing {
            let error = ApiError::new(
                500,
                "server_error",
                Some("provider_key_missing"),
                format!(
                    "The gateway has no credentials for provider {:?}: the proxy's \
                     environment variable {} is not set.",
                    provider.name,
                    provider.api_key_env.as_deref().unwrap_or_default()
                ),
            );
            return self.reject(host, error);
        }
        let path = account_path(provider, account, &self.req.path);
        let place = Place::Inline(if self.chains {
            ClusterChoice::FirstPosition
        } else {
            ClusterChoice::Provider
        });
        let present = self.req.client_headers(host);
        if let Err(e) = point_at_provider(host, &present, provider, &path, None, place) {
            let error = internal(format!("could not rewrite the request headers: {e}"));
            return self.reject(host, error);
        }
        self.phase = Phase::Forwarded;
        Flow::Continue
    }
}

/// The provider's path for the caller's `/v1/...` path (query kept): under
/// the base path for OpenAI; Azure serves files and batches under
/// `/openai` with its `api-version`, and stored responses on its v1 API.
fn account_path(provider: &Provider, account: Account, caller_path: &str) -> String {
    let rest = caller_path.strip_prefix("/v1").unwrap_or(caller_path);
    let base = &provider.base_path;
    match (provider.kind, account) {
        (ProviderKind::AzureOpenAi, Account::StoredResponses) => format!("{base}/openai/v1{rest}"),
        (ProviderKind::AzureOpenAi, _) => {
            let version = provider.api_version.as_deref().unwrap_or_default();
            let join = if rest.contains('?') { '&' } else { '?' };
            format!("{base}/openai{rest}{join}api-version={version}")
        }
        _ => format!("{base}{rest}"),
    }
}

fn no_account_provider(path: &str) -> ApiError {
    let shown = path.split_once('?').map_or(path, |(p, _)| p);
    ApiError::new(
        404,
        "invalid_request_error",
        Some("unknown_url"),
        format!(
            "No provider serves {shown} here: calls on stored files, batches and responses go \
             to the gateway's default_provider, and none is configured (no provider of kind \
             openai or azure_openai)."
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::compiled;

    #[test]
    fn paths_follow_each_providers_layout() {
        let c = compiled(
            r#"{"providers":[
                {"name":"o","kind":"openai","base_url":"https://api.openai.com/v1"},
                {"name":"a","kind":"azure_openai","base_url":"https://x.openai.azure.com",
                 "api_version":"2024-10-21"}],
               "models":[{"name":"m","provider":"o"}]}"#,
        );
        let (o, a) = (&c.config.providers[0], &c.config.providers[1]);
        assert_eq!(
            account_path(o, Account::Files, "/v1/files/file-1/content"),
            "/v1/files/file-1/content"
        );
        assert_eq!(
            account_path(a, Account::Files, "/v1/files?purpose=batch"),
            "/openai/files?purpose=batch&api-version=2024-10-21"
        );
        assert_eq!(
            account_path(a, Account::Batches, "/v1/batches/b1/cancel"),
            "/openai/batches/b1/cancel?api-version=2024-10-21"
        );
        assert_eq!(
            account_path(a, Account::StoredResponses, "/v1/responses/resp_1"),
            "/openai/v1/responses/resp_1"
        );
        assert_eq!(c.config.account_provider, Some(0));
    }
}
