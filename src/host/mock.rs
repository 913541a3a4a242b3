//! The test host: one mock of `Host` and `SharedData` for every native
//! test. It behaves like Envoy's header maps, buffers and shared data, and
//! injects the faults a real proxy produces: every host call that can fail
//! can be made to (`MockHost::fail` with the `Op`s), shared-data writes can
//! be refused or lose to a rival worker (`MockShared`). It also counts the host calls a request
//! makes, for the profiling driver in the filter's tests.
//!
//! Tests that need shared data alone use `MockShared`, the same store a
//! `MockHost` holds.

use std::cell::RefCell;
use std::collections::HashMap;

use serde_json::Value;

use crate::host::{Callout, CalloutAnswer, CalloutKind, Host, HostError, HostResult, SharedData};

/// One `send_response` call.
#[derive(Debug, Clone)]
pub struct Sent {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Sent {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("local reply is not JSON ({e}): {:?}", self.text()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Host operations that can be made to fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    SetRequestHeader,
    RemoveRequestHeader,
    RequestHeaderNames,
    RequestBody,
    ReplaceRequestBody,
    SetResponseHeader,
    RemoveResponseHeader,
    ResponseHeaderNames,
    ResponseBody,
    ReplaceResponseBody,
    SendResponse,
    /// `call_out` and `call_out_detached`: the host refused to dispatch.
    CallOut,
    ResumeRequest,
    ResumeResponse,
}

pub const SETTERS: &[Op] = &[
    Op::SetRequestHeader,
    Op::RemoveRequestHeader,
    Op::ReplaceRequestBody,
    Op::SetResponseHeader,
    Op::RemoveResponseHeader,
    Op::ReplaceResponseBody,
];

#[derive(Debug, Default)]
pub struct MockHost {
    /// Lowercase names, in order; a name may appear more than once.
    pub request_headers: Vec<(String, String)>,
    pub response_headers: Vec<(String, String)>,
    pub request_body: Vec<u8>,
    pub response_body: Vec<u8>,
    pub sent: Vec<Sent>,
    pub code_details: Option<String>,
    pub counters: HashMap<String, u64>,
    /// Operations that return `Err(HostError)`.
    pub failing: Vec<Op>,
    /// Successful calls of `replace_request_body` / `replace_response_body`.
    pub request_body_replacements: usize,
    pub response_body_replacements: usize,
    pub properties: HashMap<String, Vec<u8>>,
    /// Proxy-wide shared data, with its own faults.
    pub shared: MockShared,
    pub now_ms: u64,
    pub gauges: HashMap<String, u64>,
    pub histograms: HashMap<String, Vec<u64>>,
    /// Host calls by kind, and the bytes they moved, for the profiling driver.
    pub calls: RefCell<HashMap<&'static str, (u64, u64)>>,
    /// Calls dispatched, in order; a test answers them with `answer`.
    pub callouts: Vec<SentCallout>,
    /// Detached calls' handlers, by id, until a test answers them.
    pub detached: Detached,
    /// `resume_request` / `resume_response` calls that succeeded.
    pub resumed_requests: usize,
    pub resumed_responses: usize,
    /// The last tick of the root context asked for (`wake_root_in`).
    pub root_wake_ms: Option<u64>,
}

/// Outstanding detached calls' handlers, by id.
#[derive(Default)]
pub struct Detached(pub HashMap<u32, crate::host::DetachedHandler>);

impl std::fmt::Debug for Detached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// One call the filter dispatched, copied out of its borrowed form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentCallout {
    pub id: u32,
    pub cluster: String,
    /// `:path` of an HTTP call, `service/method` of a gRPC call.
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub timeout_ms: u64,
    pub detached: bool,
}

impl SentCallout {
    fn of(id: u32, call: &Callout, detached: bool) -> Self {
        let own = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect()
        };
        let (target, headers, body) = match call.kind {
            CalloutKind::Http {
                method,
                path,
                authority,
                headers,
                body,
            } => {
                let mut all = own(&[
                    (":method", method),
                    (":path", path),
                    (":authority", authority),
                ]);
                all.extend(own(headers));
                (path.to_string(), all, body.to_vec())
            }
            CalloutKind::Grpc {
                service,
                method,
                metadata,
                message,
            } => (
                format!("{service}/{method}"),
                own(metadata),
                message.to_vec(),
            ),
        };
        SentCallout {
            id,
            cluster: call.cluster.to_string(),
            target,
            headers,
            body,
            timeout_ms: call.timeout_ms,
            detached,
        }
    }
}

fn get_header(headers: &[(String, String)], name: &str) -> Option<String> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.clone())
}

/// Sets a header as Envoy's replace does.
pub fn set_header(headers: &mut Vec<(String, String)>, name: &str, value: &str) {
    let name = name.to_ascii_lowercase();
    match headers.iter().position(|(n, _)| *n == name) {
        Some(i) => {
            headers[i].1 = value.to_string();
            // Like Envoy's replace: one value remains.
            let mut seen = false;
            headers.retain(|(n, _)| {
                if *n != name {
                    return true;
                }
                let keep = !seen;
                seen = true;
                keep
            });
        }
        None => headers.push((name, value.to_string())),
    }
}

fn remove_header(headers: &mut Vec<(String, String)>, name: &str) {
    headers.retain(|(n, _)| n != name);
}

impl MockHost {
    pub fn new(method: &str, path: &str) -> Self {
        MockHost {
            request_headers: vec![
                (":method".into(), method.into()),
                (":path".into(), path.into()),
                (":authority".into(), "gateway.local".into()),
                (":scheme".into(), "http".into()),
            ],
            ..MockHost::default()
        }
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.request_headers.push((name.into(), value.into()));
        self
    }

    /// Replaces every value of request header `name`.
    pub fn with_only_header(mut self, name: &str, value: &str) -> Self {
        remove_header(&mut self.request_headers, name);
        self.with_header(name, value)
    }

    pub fn with_body(mut self, body: &[u8]) -> Self {
        self.request_body = body.to_vec();
        self
    }

    pub fn fail(&mut self, ops: &[Op]) {
        self.failing.extend_from_slice(ops);
    }

    /// Notes one host call of `kind` that moved `bytes` across the boundary.
    pub fn tally(&self, kind: &'static str, bytes: usize) {
        let mut calls = self.calls.borrow_mut();
        let entry = calls.entry(kind).or_default();
        entry.0 += 1;
        entry.1 += bytes as u64;
    }

    pub fn check(&self, op: Op) -> HostResult {
        if self.failing.contains(&op) {
            Err(HostError(format!("{op:?} refused by the mock")))
        } else {
            Ok(())
        }
    }

    pub fn req(&self, name: &str) -> Option<String> {
        get_header(&self.request_headers, name)
    }

    pub fn resp(&self, name: &str) -> Option<String> {
        get_header(&self.response_headers, name)
    }

    /// The one local reply; panics unless exactly one was sent.
    pub fn reply(&self) -> &Sent {
        assert_eq!(
            self.sent.len(),
            1,
            "expected exactly one local reply: {:?}",
            self.sent
        );
        &self.sent[0]
    }

    pub fn respond(
        &mut self,
        status: u16,
        headers: &[(&str, &str)],
        body: &[u8],
        details: Option<&str>,
    ) {
        self.response_headers = vec![(":status".into(), status.to_string())];
        for (n, v) in headers {
            self.response_headers.push((n.to_string(), v.to_string()));
        }
        self.response_body = body.to_vec();
        self.code_details = details.map(str::to_string);
    }
}

impl MockHost {
    /// Runs a detached call's handler with `answer`, as the root context
    /// would; false when no such call is outstanding.
    pub fn answer_detached(&mut self, id: u32, answer: CalloutAnswer) -> bool {
        match self.detached.0.remove(&id) {
            Some(then) => {
                then(self, answer);
                true
            }
            None => false,
        }
    }

    fn dispatch(&mut self, call: &Callout, detached: bool) -> HostResult<u32> {
        self.tally("call_out", call_size(call));
        self.check(Op::CallOut)?;
        let id = u32::try_from(self.callouts.len() + 1).unwrap_or(u32::MAX);
        self.callouts.push(SentCallout::of(id, call, detached));
        Ok(id)
    }
}

fn call_size(call: &Callout) -> usize {
    match call.kind {
        CalloutKind::Http { body, .. } => body.len(),
        CalloutKind::Grpc { message, .. } => message.len(),
    }
}

impl SharedData for MockHost {
    fn shared_get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        let found = self.shared.shared_get(key);
        self.tally("shared_get", found.as_ref().map_or(0, |(v, _)| v.len()));
        found
    }
    fn shared_set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> HostResult<bool> {
        self.tally("shared_set", value.len());
        self.shared.shared_set(key, value, cas)
    }
}

impl Host for MockHost {
    fn request_header(&self, name: &str) -> Option<String> {
        self.tally("request_header", 0);
        self.req(name)
    }
    fn request_header_names(&self) -> HostResult<Vec<String>> {
        // The host copies the whole map, values included.
        let size = self
            .request_headers
            .iter()
            .map(|(n, v)| n.len() + v.len())
            .sum();
        self.tally("request_header_names", size);
        self.check(Op::RequestHeaderNames)?;
        Ok(self
            .request_headers
            .iter()
            .map(|(n, _)| n.clone())
            .collect())
    }
    fn set_request_header(&mut self, name: &str, value: &str) -> HostResult {
        self.tally("set_request_header", value.len());
        self.check(Op::SetRequestHeader)?;
        set_header(&mut self.request_headers, name, value);
        Ok(())
    }
    fn remove_request_header(&mut self, name: &str) -> HostResult {
        self.tally("remove_request_header", 0);
        self.check(Op::RemoveRequestHeader)?;
        remove_header(&mut self.request_headers, name);
        Ok(())
    }
    fn request_body(&self, size: usize) -> HostResult<Vec<u8>> {
        self.tally("request_body", size);
        self.check(Op::RequestBody)?;
        Ok(self.request_body[..size.min(self.request_body.len())].to_vec())
    }
    fn replace_request_body(&mut self, old_size: usize, body: &[u8]) -> HostResult {
        self.tally("replace_request_body", body.len());
        self.check(Op::ReplaceRequestBody)?;
        let end = old_size.min(self.request_body.len());
        self.request_body.splice(..end, body.iter().copied());
        self.request_body_replacements += 1;
        Ok(())
    }
    fn response_header(&self, name: &str) -> Option<String> {
        self.tally("response_header", 0);
        self.resp(name)
    }
    fn response_header_names(&self) -> HostResult<Vec<String>> {
        // The host copies the whole map, values included.
        let size = self
            .response_headers
            .iter()
            .map(|(n, v)| n.len() + v.len())
            .sum();
        self.tally("response_header_names", size);
        self.check(Op::ResponseHeaderNames)?;
        Ok(self
            .response_headers
            .iter()
            .map(|(n, _)| n.clone())
            .collect())
    }
    fn set_response_header(&mut self, name: &str, value: &str) -> HostResult {
        self.tally("set_response_header", value.len());
        self.check(Op::SetResponseHeader)?;
        set_header(&mut self.response_headers, name, value);
        Ok(())
    }
    fn remove_response_header(&mut self, name: &str) -> HostResult {
        self.tally("remove_response_header", 0);
        self.check(Op::RemoveResponseHeader)?;
        remove_header(&mut self.response_headers, name);
        Ok(())
    }
    fn response_body(&self, size: usize) -> HostResult<Vec<u8>> {
        self.tally("response_body", size);
        self.check(Op::ResponseBody)?;
        Ok(self.response_body[..size.min(self.response_body.len())].to_vec())
    }
    fn replace_response_body(&mut self, old_size: usize, body: &[u8]) -> HostResult {
        self.tally("replace_response_body", body.len());
        self.check(Op::ReplaceResponseBody)?;
        let end = old_size.min(self.response_body.len());
        self.response_body.splice(..end, body.iter().copied());
        self.response_body_replacements += 1;
        Ok(())
    }
    fn response_code_details(&self) -> Option<String> {
        self.tally("property", 0);
        self.code_details.clone()
    }
    fn send_response(&mut self, status: u16, headers: &[(&str, &str)], body: &[u8]) -> HostResult {
        self.tally("send_response", body.len());
        self.check(Op::SendResponse)?;
        self.sent.push(Sent {
            status,
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            body: body.to_vec(),
        });
        Ok(())
    }
    fn now_unix_micros(&self) -> u64 {
        self.tally("now", 0);
        if self.now_ms == 0 {
            1_700_000_000_000_000
        } else {
            self.now_ms * 1000
        }
    }
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        self.tally("property", 0);
        self.properties.get(&path.join(".")).cloned()
    }
    fn set_property(&mut self, path: &[&str], value: &[u8]) -> HostResult {
        self.tally("set_property", value.len());
        self.properties.insert(path.join("."), value.to_vec());
        Ok(())
    }
    fn call_out(&mut self, call: &Callout) -> HostResult<u32> {
        self.dispatch(call, false)
    }
    fn call_out_detached(
        &mut self,
        call: &Callout,
        then: crate::host::DetachedHandler,
    ) -> HostResult<u32> {
        let id = self.dispatch(call, true)?;
        self.detached.0.insert(id, then);
        Ok(id)
    }
    fn wake_root_in(&mut self, ms: u64) -> HostResult {
        self.tally("wake_root", 0);
        self.root_wake_ms = Some(ms);
        Ok(())
    }
    fn resume_request(&mut self) -> HostResult {
        self.tally("resume", 0);
        self.check(Op::ResumeRequest)?;
        self.resumed_requests += 1;
        Ok(())
    }
    fn resume_response(&mut self) -> HostResult {
        self.tally("resume", 0);
        self.check(Op::ResumeResponse)?;
        self.resumed_responses += 1;
        Ok(())
    }
    fn count(&mut self, name: &str, delta: u64) {
        fits_table(name, crate::metrics::Kind::Counter);
        // Like the glue: a zero increment makes no host call.
        if delta > 0 {
            self.tally("metric", name.len());
        }
        *self.counters.entry(name.to_string()).or_default() += delta;
    }
    fn gauge(&mut self, name: &str, value: u64) {
        fits_table(name, crate::metrics::Kind::Gauge);
        self.tally("metric", name.len());
        self.gauges.insert(name.to_string(), value);
    }
    fn histogram(&mut self, name: &str, value: u64) {
        fits_table(name, crate::metrics::Kind::Histogram);
        self.tally("metric", name.len());
        self.histograms
            .entry(name.to_string())
            .or_default()
            .push(value);
    }
}

/// Proxy-wide shared data with Envoy's compare-and-swap rules: a write with
/// a token lands only if nobody wrote the key since that token was read (a
/// token is ignored for an absent key). Its faults: a proxy that refuses
/// writes, and rival workers that write just before ours.
#[derive(Debug, Default)]
pub struct MockShared {
    pub values: HashMap<String, (Vec<u8>, u32)>,
    last_token: u32,
    /// Calls of `shared_set`, refused and lost ones included.
    pub set_calls: u32,
    /// The token of every `shared_set`, in order (`None`: unprotected).
    pub set_tokens: Vec<Option<u32>>,
    /// Every `shared_set` fails with a host error.
    pub refuse_sets: bool,
    /// Another worker, run just before each of our compare-and-swap writes.
    pub rival: Option<Rival>,
}

/// Another Envoy worker on the same shared data. Before each of our
/// compare-and-swap writes, while it has turns left, it acts on the store
/// (it is given the key we are about to write), so our write loses and
/// must re-read.
pub struct Rival {
    pub turns: u32,
    pub act: RivalAct,
}

/// What a rival does to the store, given the key of the write it races.
pub type RivalAct = Box<dyn FnMut(&mut MockShared, &str)>;

impl Rival {
    /// Writes `value` over the key we are about to write, `turns` times.
    pub fn writing(value: Vec<u8>, turns: u32) -> Rival {
        Rival {
            turns,
            act: Box::new(move |store, key| store.write(key, &value)),
        }
    }

    /// Rewrites the key's current value before every write of ours: no
    /// compare-and-swap ever lands.
    pub fn always_conflicting() -> Rival {
        Rival {
            turns: u32::MAX,
            act: Box::new(|store, key| {
                if let Some(current) = store.value(key) {
                    store.write(key, &current);
                }
            }),
        }
    }
}

impl std::fmt::Debug for Rival {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Rival({} turns)", self.turns)
    }
}

impl MockShared {
    /// Writes `value` as another writer would, with a fresh token.
    pub fn write(&mut self, key: &str, value: &[u8]) {
        self.last_token += 1;
        self.values
            .insert(key.to_string(), (value.to_vec(), self.last_token));
    }

    /// The value under `key`, without its token.
    pub fn value(&self, key: &str) -> Option<Vec<u8>> {
        self.values.get(key).map(|(value, _)| value.clone())
    }
}

impl SharedData for MockShared {
    fn shared_get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.values.get(key).cloned()
    }

    fn shared_set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> HostResult<bool> {
        self.set_calls += 1;
        self.set_tokens.push(cas);
        if self.refuse_sets {
            return Err(HostError("refused".into()));
        }
        if cas.is_some() {
            // Taken out while it acts, so its own writes are not raced.
            if let Some(mut rival) = self.rival.take() {
                if rival.turns > 0 {
                    rival.turns -= 1;
                    (rival.act)(self, key);
                }
                self.rival = Some(rival);
            }
        }
        if let (Some(cas), Some((_, token))) = (cas, self.values.get(key)) {
            if cas != *token {
                return Ok(false);
            }
        }
        self.write(key, value);
        Ok(true)
    }
}

mod tests {
    use super::*;

    #[test]
    fn mock_host_behaves_like_a_header_map_and_buffer() {
        let mut h = MockHost::new("GET", "/")
            .with_header("x-a", "1")
            .with_header("x-a", "2");
        h.set_request_header("X-A", "3").unwrap();
        assert_eq!(
            h.request_headers.iter().filter(|(n, _)| n == "x-a").count(),
            1
        );
        assert_eq!(h.req("x-a").as_deref(), Some("3"));
        h.remove_request_header("x-a").unwrap();
        assert_eq!(h.req("x-a"), None);
        h.request_body = b"hello world".to_vec();
        assert_eq!(h.request_body(5).unwrap(), b"hello");
        h.replace_request_body(5, b"bye").unwrap();
        assert_eq!(h.request_body, b"bye world");
        h.fail(SETTERS);
        assert!(h.set_request_header("x", "y").is_err());
        assert!(h.remove_request_header(":path").is_err());
        assert_eq!(h.req(":path").as_deref(), Some("/"));
        assert!(h.send_response(200, &[], b"").is_ok());
    }
}

/// Every metric a test emits must be one the native build can define.
fn fits_table(name: &str, kind: crate::metrics::Kind) {
    if let Some(why) = crate::metrics::misfit(name, kind) {
        panic!("metric update {name}: {why}");
    }
}
