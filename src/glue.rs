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
use crate::core::api_error::ApiError;
use crate::host::{Host, HostError, HostResult, SharedData};
use crate::metrics::NameMap;
use crate::pipeline::filter::{Flow, RequestFilter, Role};

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

struct Root {
    config: Option<Rc<Config>>,
    /// The upstream (cluster) half runs under a root id ending in ".upstream".
    upstream_half: bool,
}

impl Context for Root {}

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

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(match &self.config {
            Some(config) => Box::new(Http {
                filter: RequestFilter::new(Rc::clone(config), self.role(config)),
                request_body_size: 0,
            }),
            None => Box::new(Unconfigured),
        })
    }
}

impl Root {
    fn role(&self, config: &Config) -> Role {
        if self.upstream_half {
            Role::Attempt
        } else if config.failover.enabled {
            Role::Router
        } else {
            Role::Standalone
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
    filter: RequestFilter,
    request_body_size: usize,
}

impl Context for Http {
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

/// Stands in when no valid configuration was loaded, so requests get a clear
/// error instead of passing through ungoverned.
struct Unconfigured;

impl Context for Unconfigured {}

impl HttpContext for Unconfigured {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let error = ApiError::new(
            503,
            "server_error",
            Some("gateway_not_configured"),
            "The gateway has no valid configuration; see the proxy's log.".into(),
        );
        let _ = ProxyHost::default().send_response(
            503,
            &[("content-type", "application/json")],
            &error.body(),
        );
        Action::Pause
    }
}

thread_local! {
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
