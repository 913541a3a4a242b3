//! The proxy-wasm adapter: contexts, the `Host` implementation and logging.
//!
//! It calls `proxy_wasm::hostcalls` directly rather than the SDK's trait
//! helpers, which unwrap host results; here every result is handled.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType, Status};

use crate::config::{compile, Config};
use crate::host::{
    Callout, CalloutAnswer, CalloutId, CalloutKind, DetachedHandler, Host, HostError, HostResult,
    SharedData,
};
use crate::metrics::NameMap;
use crate::pipeline::{Filter, Flow};

proxy_wasm::main! {{
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(log::LevelFilter::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { config: None, upstream_half: false }) });
}}

struct HostLogger;
static LOGGER: HostLogger = HostLogger;

impl log::Log for HostLogger {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        let level = match record.level() {
            log::Level::Error => LogLevel::Error,
            log::Level::Warn => LogLevel::Warn,
            log::Level::Info => LogLevel::Info,
            log::Level::Debug => LogLevel::Debug,
            log::Level::Trace => LogLevel::Trace,
        };
        // A failed log call has nowhere to be reported.
        let _ = hostcalls::log(level, &record.args().to_string());
    }
    fn flush(&self) {}
}

fn host_error(what: &str, status: Status) -> HostError {
    HostError(format!("{what} failed: {status:?}"))
}

/// How soon detached calls leave after being queued.
const DETACHED_TICK_MS: u64 = 1;

struct Root {
    config: Option<Rc<Config>>,
    /// The upstream (cluster) half runs under a root id ending in ".upstream".
    upstream_half: bool,
}

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, _: usize, body_size: usize, _: usize) {
        let answer = http_call_answer(body_size);
        run_detached(token, answer);
    }

    fn on_grpc_call_response(&mut self, token: u32, status: u32, size: usize) {
        run_detached(token, grpc_call_answer(status, size));
    }
}

/// Runs a detached call's handler with its answer.
fn run_detached(token: u32, answer: CalloutAnswer) {
    match DETACHED_PENDING.with(|p| p.borrow_mut().remove(&token)) {
        Some(then) => then(&mut ProxyHost::default(), answer),
        None => log::warn!("an answer came for call {token}, which nobody waits for"),
    }
}

/// The answer of the HTTP call being delivered: no `:status` means none
/// came (timeout, reset, no healthy host).
fn http_call_answer(body_size: usize) -> CalloutAnswer {
    let headers = match hostcalls::get_map_bytes(MapType::HttpCallResponseHeaders) {
        Ok(pairs) => pairs
            .into_iter()
            .map(|(n, v)| (n, String::from_utf8_lossy(&v).into_owned()))
            .collect::<Vec<_>>(),
        Err(s) => return CalloutAnswer::Failed(format!("could not read the answer: {s:?}")),
    };
    let status = headers
        .iter()
        .find(|(n, _)| n == ":status")
        .and_then(|(_, v)| v.parse().ok());
    let Some(status) = status else {
        return CalloutAnswer::Failed("no answer (timeout, reset or no healthy host)".into());
    };
    match hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size) {
        Ok(body) => CalloutAnswer::Http {
            status,
            headers,
            body: body.unwrap_or_default(),
        },
        Err(s) => CalloutAnswer::Failed(format!("could not read the answer's body: {s:?}")),
    }
}

/// The answer of the gRPC call being delivered: a message with status 0,
/// or the status the call closed with.
fn grpc_call_answer(status: u32, size: usize) -> CalloutAnswer {
    if status != 0 {
        let message = hostcalls::get_grpc_status()
            .ok()
            .and_then(|(_, m)| m)
            .unwrap_or_default();
        return CalloutAnswer::Grpc {
            status,
            message: message.into_bytes(),
        };
    }
    match hostcalls::get_buffer(BufferType::GrpcReceiveBuffer, 0, size) {
        Ok(message) => CalloutAnswer::Grpc {
            status: 0,
            message: message.unwrap_or_default(),
        },
        Err(s) => CalloutAnswer::Failed(format!("could not read the gRPC answer: {s:?}")),
    }
}

/// A call with its own copies of everything, so it can wait for the root
/// context's next tick.
struct OwnedCallout {
    cluster: String,
    grpc: bool,
    /// HTTP: `:method`, `:path`, `:authority`, then the headers; gRPC:
    /// `service`, `method`, then the metadata.
    head: Vec<(String, String)>,
    body: Vec<u8>,
    timeout_ms: u64,
}

impl OwnedCallout {
    fn of(call: &Callout) -> Self {
        let own = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect()
        };
        let (grpc, head, body) = match call.kind {
            CalloutKind::Http {
                method,
                path,
                authority,
                headers,
                body,
            } => {
                let mut head = own(&[
                    (":method", method),
                    (":path", path),
                    (":authority", authority),
                ]);
                head.extend(own(headers));
                (false, head, body.to_vec())
            }
            CalloutKind::Grpc {
                service,
                method,
                metadata,
                message,
            } => {
                let mut head = own(&[("service", service), ("method", method)]);
                head.extend(own(metadata));
                (true, head, message.to_vec())
            }
        };
        OwnedCallout {
            cluster: call.cluster.to_string(),
            grpc,
            head,
            body,
            timeout_ms: call.timeout_ms,
        }
    }

    fn dispatch(&self) -> HostResult<CalloutId> {
        let timeout = std::time::Duration::from_millis(self.timeout_ms);
        if self.grpc {
            let (Some((_, service)), Some((_, method))) = (self.head.first(), self.head.get(1))
            else {
                return Err(HostError("a gRPC call without service and method".into()));
            };
            let metadata: Vec<(&str, &[u8])> = self.head[2..]
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_bytes()))
                .collect();
            hostcalls::dispatch_grpc_call(
                &self.cluster,
                service,
                method,
                metadata,
                Some(&self.body),
                timeout,
            )
            .map_err(|s| host_error("dispatch a gRPC call", s))
        } else {
            let headers: Vec<(&str, &str)> = self
                .head
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            hostcalls::dispatch_http_call(&self.cluster, headers, Some(&self.body), vec![], timeout)
                .map_err(|s| host_error("dispatch an HTTP call", s))
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let doc = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size) {
            Ok(Some(doc)) => doc,
            Ok(None) => Vec::new(),
            Err(status) => {
                log::error!("could not read the plugin configuration: {status:?}");
                return false;
            }
        };
        self.upstream_half = hostcalls::get_property(vec!["plugin_root_id"])
            .ok()
            .flatten()
            .is_some_and(|id| id.ends_with(b".upstream"));
        match compile(&doc, &|var| std::env::var(var).ok()) {
            Ok(compiled) => {
                for warning in &compiled.warnings {
                    log::warn!("{warning}");
                }
                log::info!(
                    "configured {} providers and {} models",
                    compiled.config.providers.len(),
                    compiled.config.models.len()
                );
                if !self.upstream_half {
                    crate::quota::admission::prepare_buckets(
                        &compiled.config,
                        &mut ProxyHost::default(),
                    );
                }
                self.config = Some(Rc::new(compiled.config));
                true
            }
            Err(e) => {
                log::error!("invalid configuration: {e}");
                false
            }
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    // Detached calls are dispatched here, from the root context's own
    // callback, so that their answers come back to the root (the SDK sends
    // an answer to the context that was active when the call was made, and
    // drops it once that context is gone).
    fn on_tick(&mut self) {
        // Leases this worker took from are checked for idling until none
        // holds unused units (then the timer stops); their returns join
        // the queue that leaves below.
        let holding = match (&self.config, self.upstream_half) {
            (Some(config), false) => config.store().is_some_and(|store| {
                crate::quota::lease::return_idle(&mut ProxyHost::default(), store)
            }),
            _ => false,
        };
        let queued = DETACHED_QUEUE.with(|q| std::mem::take(&mut *q.borrow_mut()));
        for (call, then) in queued {
            match call.dispatch() {
                Ok(token) => {
                    DETACHED_PENDING.with(|p| p.borrow_mut().insert(token, then));
                }
                Err(e) => then(&mut ProxyHost::default(), CalloutAnswer::Failed(e.0)),
            }
        }
        let period = if holding {
            std::time::Duration::from_millis(crate::quota::lease::IDLE_CHECK_MS)
        } else {
            std::time::Duration::ZERO
        };
        if let Err(s) = hostcalls::set_tick_period(period) {
            log::warn!("could not set the root context's timer: {s:?}");
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(match &self.config {
            Some(config) => Box::new(Http {
                filter: self.filter(config),
                request_body_size: 0,
            }),
            None => Box::new(Unconfigured),
        })
    }
}

impl Root {
    /// The upstream half serves attempts; the listener half routes.
    fn filter(&self, config: &Rc<Config>) -> Filter {
        if self.upstream_half {
            Filter::upstream(Rc::clone(config))
        } else {
            Filter::listener(Rc::clone(config))
        }
    }
}

fn action(flow: Flow) -> Action {
    match flow {
        Flow::Continue => Action::Continue,
        Flow::Pause => Action::Pause,
    }
}

struct Http {
    filter: Filter,
    request_body_size: usize,
}

impl Context for Http {
    fn on_http_call_response(&mut self, token: u32, _: usize, body_size: usize, _: usize) {
        self.on_callout(token, http_call_answer(body_size));
    }

    fn on_grpc_call_response(&mut self, token: u32, status: u32, size: usize) {
        self.on_callout(token, grpc_call_answer(status, size));
    }

    // Envoy calls this when the stream ends, before access logging; an
    // upstream filter whose attempt was reset, refused or timed out gets
    // no other callback (and no `on_log`).
    fn on_done(&mut self) -> bool {
        self.filter.on_done(&mut ProxyHost::default());
        true
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        action(
            self.filter
                .on_request_headers(&mut ProxyHost::default(), end_of_stream),
        )
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.request_body_size = body_size;
        action(
            self.filter
                .on_request_body(&mut ProxyHost::default(), body_size, end_of_stream),
        )
    }

    fn on_http_request_trailers(&mut self, _: usize) -> Action {
        action(
            self.filter
                .on_request_trailers(&mut ProxyHost::default(), self.request_body_size),
        )
    }

    fn on_http_response_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        action(
            self.filter
                .on_response_headers(&mut ProxyHost::default(), end_of_stream),
        )
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        action(
            self.filter
                .on_response_body(&mut ProxyHost::default(), body_size, end_of_stream),
        )
    }

    fn on_log(&mut self) {
        self.filter.on_done(&mut ProxyHost::default());
    }
}

impl Http {
    fn on_callout(&mut self, token: u32, answer: CalloutAnswer) {
        self.filter
            .on_callout(&mut ProxyHost::default(), token, answer);
    }
}

/// Stands in when no valid configuration was loaded, so requests get a clear
/// error instead of passing through ungoverned.
struct Unconfigured;

impl Context for Unconfigured {}

impl HttpContext for Unconfigured {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let error = crate::pipeline::not_configured();
        let _ = ProxyHost::default().send_response(
            503,
            &[("content-type", "application/json")],
            &error.body(),
        );
        Action::Pause
    }
}

thread_local! {
    /// Detached calls waiting for the root context's next tick.
    static DETACHED_QUEUE: RefCell<Vec<(OwnedCallout, DetachedHandler)>> = const { RefCell::new(Vec::new()) };
    /// Detached calls dispatched, by token, until their answer comes.
    static DETACHED_PENDING: RefCell<std::collections::HashMap<u32, DetachedHandler>> =
        RefCell::new(std::collections::HashMap::new());
    /// Ids handed out for queued detached calls (not Envoy's tokens).
    static DETACHED_IDS: Cell<u32> = const { Cell::new(0) };
    /// Metric ids by name; each VM (worker thread) defines its own. Looked
    /// up on every metric update, so hashed with the cheap `NameHasher`.
    static METRICS: RefCell<NameMap<u32>> = RefCell::new(NameMap::default());
}

/// The proxy as the filter sees it during one callback.
#[derive(Default)]
struct ProxyHost {
    /// The clock, read once per callback: a callback takes microseconds.
    now_us: Cell<Option<u64>>,
}

impl SharedData for ProxyHost {
    fn shared_get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        match hostcalls::get_shared_data(key) {
            Ok((Some(value), Some(cas))) => Some((value, cas)),
            _ => None,
        }
    }
    fn shared_set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> HostResult<bool> {
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(true),
            Err(Status::CasMismatch) => Ok(false),
            Err(s) => Err(host_error("set shared data", s)),
        }
    }
}

impl ProxyHost {
    // The SDK's string getters unwrap UTF-8 and would trap the VM on a
    // header value with obs-text bytes, which HTTP allows and any client can
    // send; the byte getters cannot, and the rare such value is read lossily.
    fn header(map: MapType, name: &str) -> Option<String> {
        let bytes = hostcalls::get_map_value_bytes(map, name).ok().flatten()?;
        Some(match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    fn header_names(map: MapType) -> HostResult<Vec<String>> {
        hostcalls::get_map_bytes(map)
            .map(|pairs| pairs.into_iter().map(|(name, _)| name).collect())
            .map_err(|s| host_error("get headers", s))
    }

    fn set_header(map: MapType, name: &str, value: Option<&str>) -> HostResult {
        hostcalls::set_map_value(map, name, value).map_err(|s| host_error("set header", s))
    }

    fn body(buffer: BufferType, size: usize) -> HostResult<Vec<u8>> {
        match hostcalls::get_buffer(buffer, 0, size) {
            Ok(body) => Ok(body.unwrap_or_default()),
            Err(s) => Err(host_error("get body", s)),
        }
    }

    fn set_body(buffer: BufferType, old_size: usize, body: &[u8]) -> HostResult {
        hostcalls::set_buffer(buffer, 0, old_size, body).map_err(|s| host_error("set body", s))
    }
}

impl Host for ProxyHost {
    fn request_header(&self, name: &str) -> Option<String> {
        Self::header(MapType::HttpRequestHeaders, name)
    }
    fn request_header_names(&self) -> HostResult<Vec<String>> {
        Self::header_names(MapType::HttpRequestHeaders)
    }
    fn set_request_header(&mut self, name: &str, value: &str) -> HostResult {
        Self::set_header(MapType::HttpRequestHeaders, name, Some(value))
    }
    fn remove_request_header(&mut self, name: &str) -> HostResult {
        Self::set_header(MapType::HttpRequestHeaders, name, None)
    }
    fn request_body(&self, size: usize) -> HostResult<Vec<u8>> {
        Self::body(BufferType::HttpRequestBody, size)
    }
    fn replace_request_body(&mut self, old_size: usize, body: &[u8]) -> HostResult {
        Self::set_body(BufferType::HttpRequestBody, old_size, body)
    }
    fn response_header(&self, name: &str) -> Option<String> {
        Self::header(MapType::HttpResponseHeaders, name)
    }
    fn response_header_names(&self) -> HostResult<Vec<String>> {
        Self::header_names(MapType::HttpResponseHeaders)
    }
    fn set_response_header(&mut self, name: &str, value: &str) -> HostResult {
        Self::set_header(MapType::HttpResponseHeaders, name, Some(value))
    }
    fn remove_response_header(&mut self, name: &str) -> HostResult {
        Self::set_header(MapType::HttpResponseHeaders, name, None)
    }
    fn response_body(&self, size: usize) -> HostResult<Vec<u8>> {
        Self::body(BufferType::HttpResponseBody, size)
    }
    fn replace_response_body(&mut self, old_size: usize, body: &[u8]) -> HostResult {
        Self::set_body(BufferType::HttpResponseBody, old_size, body)
    }
    fn response_code_details(&self) -> Option<String> {
        let bytes = hostcalls::get_property(vec!["response", "code_details"]).ok()??;
        String::from_utf8(bytes).ok()
    }
    fn send_response(&mut self, status: u16, headers: &[(&str, &str)], body: &[u8]) -> HostResult {
        hostcalls::send_http_response(u32::from(status), headers.to_vec(), Some(body))
            .map_err(|s| host_error("send local reply", s))
    }
    fn now_unix_micros(&self) -> u64 {
        if let Some(now) = self.now_us.get() {
            return now;
        }
        let now = hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        self.now_us.set(Some(now));
        now
    }
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        hostcalls::get_property(path.to_vec()).ok().flatten()
    }
    fn set_property(&mut self, path: &[&str], value: &[u8]) -> HostResult {
        hostcalls::set_property(path.to_vec(), Some(value))
            .map_err(|s| host_error("set property", s))
    }
    fn call_out(&mut self, call: &Callout) -> HostResult<CalloutId> {
        OwnedCallout::of(call).dispatch()
    }
    fn call_out_detached(
        &mut self,
        call: &Callout,
        then: DetachedHandler,
    ) -> HostResult<CalloutId> {
        // Arms the root context's timer (a stream context's tick period is
        // its root's); the call leaves from there on the next tick.
        hostcalls::set_tick_period(std::time::Duration::from_millis(DETACHED_TICK_MS))
            .map_err(|s| host_error("arm the root context's timer", s))?;
        DETACHED_QUEUE.with(|q| q.borrow_mut().push((OwnedCallout::of(call), then)));
        Ok(DETACHED_IDS.with(|ids| {
            let id = ids.get().wrapping_add(1);
            ids.set(id);
            id
        }))
    }
    fn wake_root_in(&mut self, ms: u64) -> HostResult {
        // Detached calls queued leave on a shorter tick, after which the
        // root context keeps its timer for the leases it holds.
        if DETACHED_QUEUE.with(|q| !q.borrow().is_empty()) {
            return Ok(());
        }
        hostcalls::set_tick_period(std::time::Duration::from_millis(ms.max(1)))
            .map_err(|s| host_error("arm the root context's timer", s))
    }
    fn resume_request(&mut self) -> HostResult {
        hostcalls::resume_http_request().map_err(|s| host_error("resume the request", s))
    }
    fn resume_response(&mut self) -> HostResult {
        hostcalls::resume_http_response().map_err(|s| host_error("resume the response", s))
    }
    fn count(&mut self, name: &str, delta: u64) {
        // Envoy refuses a zero increment; the series appears with its first.
        if delta == 0 {
            return;
        }
        if let Some(id) = metric_id(MetricType::Counter, name) {
            let delta = i64::try_from(delta).unwrap_or(i64::MAX);
            if let Err(s) = hostcalls::increment_metric(id, delta) {
                log::warn!("could not update metric {name}: {s:?}");
            }
        }
    }
    fn histogram(&mut self, name: &str, value: u64) {
        if let Some(id) = metric_id(MetricType::Histogram, name) {
            if let Err(s) = hostcalls::record_metric(id, value) {
                log::warn!("could not update metric {name}: {s:?}");
            }
        }
    }
    fn gauge(&mut self, name: &str, value: u64) {
        if let Some(id) = metric_id(MetricType::Gauge, name) {
            if let Err(s) = hostcalls::record_metric(id, value) {
                log::warn!("could not update metric {name}: {s:?}");
            }
        }
    }
}

/// The VM's id for metric `name`, defined on first use.
fn metric_id(kind: MetricType, name: &str) -> Option<u32> {
    METRICS.with(|m| {
        let mut m = m.borrow_mut();
        if let Some(&id) = m.get(name) {
            return Some(id);
        }
        match hostcalls::define_metric(kind, name) {
            Ok(id) => {
                m.insert(name.to_string(), id);
                Some(id)
            }
            Err(s) => {
                log::warn!("could not define metric {name}: {s:?}");
                None
            }
        }
    })
}
