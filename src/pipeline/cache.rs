//! Cache stage, listener half. After admission (a hit still counts as a
//! request for quotas) a cacheable request is looked up in the proxy's
//! memory, then (with `cache.shared`) in the shared store while the
//! request waits; on a hit it is answered with the kept bytes: a stream
//! replayed as the stream its first caller got. On a miss the answer is
//! copied as it passes and kept when `finish` sees it came back whole.
//! What is cacheable and the key are `cache/key.rs`; the stores are
//! `cache/local.rs` and `cache/shared.rs`.

use super::answer::WHOLE_BUFFER;
use super::flow::Flow;
use super::state::{CacheUse, Deferred, Fill, Phase, RequestState, Routed, Router};
use crate::cache::entry::{whole_answer, Entry};
use crate::cache::key::{self, Bypass};
use crate::cache::policy::Scope;
use crate::cache::{local, shared};
use crate::config::models::Operation;
use crate::config::Config;
use crate::host::{CalloutAnswer, CalloutId, Host};
use crate::metrics;

/// Says on every cacheable answer whether it came from the cache.
pub const CACHE_RESPONSE_HEADER: &str = "x-meshllm-cache";
/// Access-log field: `hit`, `hit:shared` (from the shared store), `miss`,
/// `stored` (a miss, kept), `refresh` (the caller's `no-cache`),
/// `refresh:stored`, or `bypass:<why>`.
pub const LOG_CACHE: &str = "meshllm.cache";

/// What the lookup found.
pub(super) enum Looked {
    /// Answered from the cache: the flow to return.
    Hit(Flow),
    /// Not kept (or not cacheable): forward.
    Miss,
    /// The shared store was asked: wait for its answer.
    Ask(CalloutId),
}

impl Router {
    /// Forwards a request that waited for a call (its body is parsed
    /// again), unless the cache, asked first with `look_up`, answers it.
    pub(super) fn forward_after_wait(
        &mut self,
        host: &mut dyn Host,
        waiting: Deferred,
        look_up: bool,
    ) -> Flow {
        let Deferred {
            body,
            routed,
            chain,
            ..
        } = waiting;
        if look_up {
            match self.cache_lookup(host, &body, &routed) {
                Looked::Miss => {}
                Looked::Hit(flow) => return flow,
                Looked::Ask(id) => {
                    return self.wait_for_cache(Deferred {
                        id,
                        body,
                        routed,
                        chain,
                    })
                }
            }
        }
        match super::request::parse_body(
            &body,
            self.req.operation.unwrap_or(Operation::ChatCompletions),
        ) {
            Ok(doc) => self.forward_or_reject(host, &body, &doc, &routed, chain),
            Err(e) => self.reject(host, e),
        }
    }

    /// Parks a request while the shared store is asked.
    pub(super) fn wait_for_cache(&mut self, waiting: Deferred) -> Flow {
        self.cache_wait = Some(waiting);
        self.phase = Phase::Deferred;
        Flow::Pause
    }

    /// The shared store answered: replay what it kept, or forward.
    pub(super) fn cache_answered(
        &mut self,
        host: &mut dyn Host,
        waiting: Deferred,
        answer: &CalloutAnswer,
    ) -> Flow {
        self.phase = Phase::ReadingBody;
        let found = match (&self.req.cache, self.config.cache.as_ref()) {
            (CacheUse::Fill(fill), Some(config)) => {
                let found = shared::read(answer, &fill.key, host.now_unix_millis());
                // Kept here too: the next lookup on this proxy is local.
                if let Some(entry) = &found {
                    local::put(host, entry, config.max_entries);
                }
                found
            }
            _ => None,
        };
        let outcome = match answer {
            CalloutAnswer::Http {
                status: 200 | 404, ..
            } => "ok",
            _ => "failed",
        };
        crate::quota::store::count_call(host, "cache_lookup", outcome);
        if let Some(entry) = found {
            return self.replay(host, entry, true);
        }
        self.forward_after_wait(host, waiting, false)
    }

    /// Looks the request up; a hit is answered here.
    pub(super) fn cache_lookup(
        &mut self,
        host: &mut dyn Host,
        body: &[u8],
        routed: &Routed,
    ) -> Looked {
        let Some(config) = self.config.cache.as_ref() else {
            return Looked::Miss;
        };
        let embeddings = match self.req.operation {
            Some(Operation::ChatCompletions) => false,
            Some(Operation::Embeddings) => true,
            _ => return Looked::Miss,
        };
        let model = self.req.applied.resolve(&routed.call.model);
        if !config.covers(self.req.applied.cache(), model) {
            return Looked::Miss;
        }
        let (no_store, no_cache) = cache_control(host.request_header("cache-control"));
        let (ns, svc) = self.req.who.names();
        let scope = match config.scope {
            Scope::Namespace => ns.to_string(),
            Scope::Service => format!("{ns}/{svc}"),
            Scope::Mesh => String::new(),
        };
        let found = if no_store {
            Err(Bypass::NoStore)
        } else {
            key::key(
                config,
                &key::Request {
                    caller: self.req.caller,
                    embeddings,
                    model,
                    stream: routed.call.stream,
                    scope: &scope,
                    answer_guard: &self.req.answer_guard,
                    body,
                },
            )
        };
        let key = match found {
            Ok(key) => key,
            Err(why) => {
                self.req.cache = CacheUse::Bypass(why);
                self.req
                    .answer_headers
                    .push((CACHE_RESPONSE_HEADER.into(), "bypass".into()));
                return Looked::Miss;
            }
        };
        let now = host.now_unix_millis();
        let kept = (!no_cache)
            .then(|| local::get(host, &key, config.max_entries, now))
            .flatten();
        if let Some(entry) = kept {
            return Looked::Hit(self.replay(host, entry, false));
        }
        self.req
            .answer_headers
            .push((CACHE_RESPONSE_HEADER.into(), "miss".into()));
        self.req.cache = CacheUse::Fill(Fill {
            key,
            looked_up: !no_cache,
            copy: Vec::new(),
            spoiled: false,
            ended: false,
        });
        let store = self.config.quotas.as_ref().and_then(|q| q.store.as_ref());
        let (Some(store), true, false) = (store, config.shared, no_cache) else {
            return Looked::Miss;
        };
        let command = shared::lookup_command(&key);
        match host.call_out(&crate::quota::store::callout(store, &command)) {
            Ok(id) => Looked::Ask(id),
            Err(e) => {
                // The cache never stops a request: it goes to the provider.
                crate::quota::store::count_call(host, "cache_lookup", "failed");
                log::warn!("cache: the shared store was not asked: {e}");
                Looked::Miss
            }
        }
    }

    /// Answers with a kept answer, as the first caller got it.
    fn replay(&mut self, host: &mut dyn Host, entry: Entry, shared: bool) -> Flow {
        self.req.first_byte_us = Some(host.now_unix_micros());
        self.req.response_bytes = entry.body.len() as u64;
        self.req.cache = CacheUse::Hit {
            provider: entry.provider.clone(),
            model: entry.model.clone(),
            shared,
        };
        // HTTP's `Age`: how long ago the provider gave this answer.
        let ttl_ms = self.config.cache.as_ref().map_or(0, |c| c.ttl_s * 1000);
        let stored_ms = entry.expires_ms.saturating_sub(ttl_ms);
        let age_s = host.now_unix_millis().saturating_sub(stored_ms) / 1000;
        let mut headers = vec![
            (CACHE_RESPONSE_HEADER.to_string(), "hit".to_string()),
            ("age".to_string(), age_s.to_string()),
            (
                crate::pipeline::handoff::PROVIDER_RESPONSE_HEADER.into(),
                entry.provider,
            ),
            (
                crate::pipeline::handoff::MODEL_RESPONSE_HEADER.into(),
                entry.model,
            ),
        ];
        // A miss was announced before the shared store was asked.
        self.req
            .answer_headers
            .retain(|(name, _)| name != CACHE_RESPONSE_HEADER);
        headers.append(&mut self.req.answer_headers);
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        self.reply_as(host, 200, &entry.content_type, &headers, &entry.body)
    }

    /// Copies what passed to the caller (`passed`: the chunk went on as
    /// it is now in the buffer; false: the filter held or replaced it).
    pub(super) fn cache_copy(&mut self, host: &dyn Host, passed: bool, end_of_stream: bool) {
        let CacheUse::Fill(fill) = &mut self.req.cache else {
            return;
        };
        let limit = self.config.cache.as_ref().map_or(0, |c| c.max_entry_bytes);
        if !passed || !(200..300).contains(&self.req.status) {
            fill.spoiled = true;
        }
        if fill.spoiled {
            fill.copy = Vec::new();
            return;
        }
        if let Some(chunk) = host
            .response_body(WHOLE_BUFFER)
            .ok()
            .filter(|c| !c.is_empty())
        {
            if fill.copy.len() + chunk.len() > limit {
                fill.spoiled = true;
                fill.copy = Vec::new();
                return;
            }
            fill.copy.extend_from_slice(&chunk);
        }
        fill.ended |= end_of_stream;
    }
}

/// Keeps a whole answer; counts the lookup. Returns the access log's
/// `cache` field.
pub(super) fn cache_settle(
    cache: CacheUse,
    cfg: &Config,
    req: &RequestState,
    host: &mut dyn Host,
    labels: &metrics::Labels,
    provider: &str,
    model: &str,
) -> Option<String> {
    let outcome;
    let mut stored = false;
    match cache {
        CacheUse::Off => return None,
        CacheUse::Bypass(why) => {
            host.count_labelled(
                metrics::CACHE_LOOKUPS_TOTAL,
                labels,
                &[("outcome", "bypass")],
                1,
            );
            return Some(format!("bypass:{}", why.name()));
        }
        CacheUse::Hit { shared: true, .. } => outcome = "hit:shared",
        CacheUse::Hit { .. } => outcome = "hit",
        CacheUse::Fill(fill) => {
            outcome = if fill.looked_up { "miss" } else { "refresh" };
            let whole = fill.ended
                && !fill.spoiled
                && (200..300).contains(&req.status)
                && whole_answer(req.caller, req.streaming, &fill.copy);
            if let (true, Some(config)) = (whole, cfg.cache.as_ref()) {
                let entry = Entry {
                    key: fill.key,
                    expires_ms: host.now_unix_millis() + config.ttl_s * 1000,
                    content_type: if req.streaming {
                        "text/event-stream".into()
                    } else {
                        "application/json".into()
                    },
                    provider: provider.into(),
                    model: model.into(),
                    body: fill.copy,
                };
                local::put(host, &entry, config.max_entries);
                let store = cfg.quotas.as_ref().and_then(|q| q.store.as_ref());
                if let (true, Some(store)) = (config.shared, store) {
                    // Unique to this write: two proxies writing the same
                    // answer never append to each other's pieces.
                    let writer = format!("{}-{}", host.now_unix_micros(), req.started_us);
                    let commands = shared::write_commands(&entry, config.ttl_s, &writer);
                    shared::write(host, store, commands);
                }
                host.count_labelled(metrics::CACHE_STORES_TOTAL, labels, &[], 1);
                stored = true;
            }
        }
    }
    host.count_labelled(
        metrics::CACHE_LOOKUPS_TOTAL,
        labels,
        &[("outcome", outcome.split(':').next().unwrap_or(outcome))],
        1,
    );
    Some(match (outcome, stored) {
        ("miss", true) => "stored".into(),
        (o, true) => format!("{o}:stored"),
        (o, false) => o.into(),
    })
}

/// (`no-store`, `no-cache`) of a request's `Cache-Control`.
fn cache_control(value: Option<String>) -> (bool, bool) {
    let Some(value) = value else {
        return (false, false);
    };
    let has = |d: &str| {
        value.split(',').any(|t| {
            t.trim()
                .split('=')
                .next()
                .is_some_and(|n| n.trim().eq_ignore_ascii_case(d))
        })
    };
    (has("no-store"), has("no-cache"))
}

#[cfg(test)]
mod tests {
    use super::cache_control;

    #[test]
    fn cache_control_directives() {
        assert_eq!(cache_control(None), (false, false));
        assert_eq!(cache_control(Some("no-store".into())), (true, false));
        assert_eq!(
            cache_control(Some("max-age=0, No-Cache".into())),
            (false, true)
        );
        assert_eq!(cache_control(Some("no-storex".into())), (false, false));
    }
}
