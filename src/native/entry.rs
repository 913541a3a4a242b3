//! The event hooks Envoy calls. Each runs behind `guard`: a panic that
//! crossed into Envoy would take the proxy down, so it is caught here, the
//! stream it happened in is ended (a 500 in the request phase, a reset
//! after the answer began) and the rest of the stream is left alone.

use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use crate::core::api_error::ApiError;
use crate::pipeline::{Filter, Flow};

use super::abi::{
    self, envoy_dynamic_module_type_envoy_buffer as EnvoyBuffer,
    envoy_dynamic_module_type_envoy_http_header as EnvoyHeader,
    envoy_dynamic_module_type_module_buffer as ModuleBuffer,
};
use super::callout;
use super::config::{NativeConfig, EVENT_DETACHED, EVENT_TICK};
use super::host::NativeHost;
use super::EnvoyPtr;

/// Runs `f`, catching a panic; `fallback` is returned after one.
fn guard<R>(what: &str, fallback: R, f: impl FnOnce() -> R) -> R {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => {
            // The panic hook (see `mod.rs`) logged the message and place.
            log::error!("meshllm: a panic in {what} was caught; the stream is ended");
            fallback
        }
    }
}

/// The module's side of one stream.
struct Stream {
    config: Arc<NativeConfig>,
    /// Envoy's side of the stream, for the end of an upstream attempt that
    /// gets no `stream_complete`.
    envoy: *mut c_void,
    /// `on_done` ran.
    done: bool,
    filter: Option<Filter>,
    /// Bytes of the request body seen so far (for trailers).
    request_body_size: usize,
    /// Whether response headers went to the caller (a reply is then too late).
    answering: bool,
    /// A panic happened: every later hook lets Envoy end the stream.
    broken: bool,
}

impl Stream {
    /// Runs the filter's end of stream once.
    fn complete(&mut self, envoy: *mut c_void) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        self.run(envoy, "the end of the stream", (), |f, host| {
            f.on_done(host)
        });
    }

    /// # Safety
    /// `ptr` must be a pointer `on_http_filter_new` returned and not yet
    /// destroyed; Envoy calls a stream's hooks on one thread, one at a time.
    unsafe fn from<'a>(ptr: *const c_void) -> Option<&'a mut Stream> {
        (ptr as *mut Stream).as_mut()
    }

    /// Runs `step` on the stream's filter with a host for this callback.
    /// After a panic the stream is ended and `stop` returned from then on.
    fn run<R: Copy>(
        &mut self,
        envoy: *mut c_void,
        what: &str,
        stop: R,
        step: impl FnOnce(&mut Filter, &mut NativeHost) -> R,
    ) -> R {
        if self.broken {
            return stop;
        }
        let (config, filter) = (&self.config, &mut self.filter);
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let mut host = NativeHost::stream(EnvoyPtr(envoy), config);
            let result = filter.as_mut().map(|filter| step(filter, &mut host));
            host.finish_callback();
            result
        }));
        match outcome {
            Ok(Some(r)) => r,
            // No compiled config on this thread: the stream was answered
            // at its headers (see `unconfigured`).
            Ok(None) => stop,
            Err(_) => {
                log::error!("meshllm: a panic in {what} was caught; the stream is ended");
                self.broken = true;
                self.filter = None;
                end_broken_stream(envoy, self.answering);
                stop
            }
        }
    }
}

/// Ends a stream whose filter panicked: the caller gets a 500 before the
/// answer began, a cut connection after (never an answer with parts
/// missing, and never the request passing on unfiltered).
fn end_broken_stream(envoy: *mut c_void, answering: bool) {
    let _ = catch_unwind(|| {
        if answering {
            // SAFETY: the live stream of the current hook.
            unsafe {
                abi::envoy_dynamic_module_callback_http_filter_reset_stream(
                    envoy,
                    abi::FILTER_RESET_LOCAL_RESET,
                    ModuleBuffer::from_bytes(b"meshllm_internal_error"),
                )
            }
        } else {
            let error = ApiError::new(
                500,
                "server_error",
                Some("gateway_internal_error"),
                "The gateway failed on this request; see the proxy's log.".into(),
            );
            reply(envoy, 500, &error.body());
        }
    });
}

fn reply(envoy: *mut c_void, status: u32, body: &[u8]) {
    let mut headers = [abi::envoy_dynamic_module_type_module_http_header::new(
        b"content-type",
        b"application/json",
    )];
    // SAFETY: the live stream of the current hook; Envoy copies everything.
    unsafe {
        abi::envoy_dynamic_module_callback_http_send_response(
            envoy,
            status,
            headers.as_mut_ptr(),
            headers.len(),
            ModuleBuffer::from_bytes(body),
            ModuleBuffer::from_bytes(b"meshllm"),
        )
    }
}

/// Answers a request when this thread has no valid configuration, so it
/// gets a clear error instead of passing through ungoverned.
fn unconfigured(envoy: *mut c_void) {
    reply(envoy, 503, &crate::pipeline::not_configured().body());
}

/// # Safety
/// Envoy's buffer, valid during the hook.
unsafe fn text(buffer: EnvoyBuffer) -> String {
    String::from_utf8_lossy(buffer.as_bytes()).into_owned()
}

/// # Safety
/// `ptr` must be a config pointer `config_new` returned and not destroyed.
unsafe fn config<'a>(ptr: *const c_void) -> Option<&'a Arc<NativeConfig>> {
    (ptr as *const Arc<NativeConfig>).as_ref()
}

fn headers_status(flow: Flow) -> u32 {
    match flow {
        Flow::Continue => abi::HEADERS_CONTINUE,
        Flow::Pause => abi::HEADERS_STOP_ITERATION,
    }
}

fn body_status(flow: Flow) -> u32 {
    match flow {
        Flow::Continue => abi::BODY_CONTINUE,
        Flow::Pause => abi::BODY_STOP_ITERATION_AND_BUFFER,
    }
}

/// Bytes of the request's (or the response's) body so far: what this
/// filter buffered, then this callback's chunk unless it is that buffer.
fn body_so_far(envoy: *mut c_void, request: bool) -> usize {
    let (buffered, received) = if request {
        (abi::BODY_BUFFERED_REQUEST, abi::BODY_RECEIVED_REQUEST)
    } else {
        (abi::BODY_BUFFERED_RESPONSE, abi::BODY_RECEIVED_RESPONSE)
    };
    // SAFETY: the live stream of the current hook.
    unsafe {
        let same = if request {
            abi::envoy_dynamic_module_callback_http_received_buffered_request_body(envoy)
        } else {
            abi::envoy_dynamic_module_callback_http_received_buffered_response_body(envoy)
        };
        let size = |kind| abi::envoy_dynamic_module_callback_http_get_body_size(envoy, kind);
        size(buffered) + if same { 0 } else { size(received) }
    }
}

// ------------------------------------------------------------------ program

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const std::ffi::c_char {
    guard("program init", std::ptr::null(), || {
        super::install_logger();
        match super::missing_callbacks() {
            missing if missing.is_empty() => abi::ABI_VERSION.as_ptr().cast(),
            missing => {
                log::error!(
                    "meshllm: this Envoy lacks {} dynamic-module functions the module was built \
                     against (ABI {}): {}; use a build for this Envoy version",
                    missing.len(),
                    super::ABI_VERSION_TEXT,
                    missing.join(", ")
                );
                std::ptr::null()
            }
        }
    })
}

// ------------------------------------------------------------------ config

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    envoy: *mut c_void,
    name: EnvoyBuffer,
    document: EnvoyBuffer,
) -> *const c_void {
    guard("config creation", std::ptr::null(), || {
        // SAFETY: Envoy's buffers, valid during this call; copied.
        let (name, document) = unsafe { (text(name), document.as_bytes().to_vec()) };
        match NativeConfig::create(EnvoyPtr(envoy), &name, document) {
            Some(config) => Box::into_raw(Box::new(config)) as *const c_void,
            None => std::ptr::null(),
        }
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(config: *const c_void) {
    guard("config destruction", (), || {
        if !config.is_null() {
            // SAFETY: made by `Box::into_raw` in config_new, destroyed once.
            drop(unsafe { Box::from_raw(config as *mut Arc<NativeConfig>) });
        }
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_scheduled(
    _envoy: *mut c_void,
    config_ptr: *const c_void,
    event: u64,
) {
    guard("a scheduled event", (), || {
        // SAFETY: Envoy passes the live config.
        let Some(config) = (unsafe { config(config_ptr) }) else {
            return;
        };
        if event == EVENT_TICK && !config.upstream {
            tick(config);
        }
        if event == EVENT_DETACHED || event == EVENT_TICK {
            config.send_detached();
        }
    })
}

/// The root timer's work: leases this process took from are squared with
/// the store once idle, and checked again while some still hold units.
fn tick(config: &Arc<NativeConfig>) {
    let Some(compiled) = config.compiled() else {
        return;
    };
    let Some(store) = compiled.store() else {
        return;
    };
    let mut host = NativeHost::root(config);
    if crate::quota::lease::return_idle(&mut host, store) {
        if let Err(e) =
            super::timer::wake(Arc::downgrade(config), crate::quota::lease::IDLE_CHECK_MS)
        {
            log::warn!("quota lease: idle return not scheduled: {e}");
        }
    }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_callout_done(
    _envoy: *mut c_void,
    config_ptr: *const c_void,
    id: u64,
    result: u32,
    headers: *mut EnvoyHeader,
    headers_size: usize,
    chunks: *mut EnvoyBuffer,
    chunks_size: usize,
) {
    guard("a detached call's answer", (), || {
        // SAFETY: Envoy passes the live config and the answer's buffers.
        let Some(config) = (unsafe { config(config_ptr) }) else {
            return;
        };
        let answer = unsafe { callout::answer(result, headers, headers_size, chunks, chunks_size) };
        config.answer_detached(id, answer);
    })
}

// ------------------------------------------------------------------ streams

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_new(
    config_ptr: *const c_void,
    envoy: *mut c_void,
) -> *const c_void {
    guard("stream creation", std::ptr::null(), || {
        // SAFETY: Envoy passes the live config.
        let Some(config) = (unsafe { config(config_ptr) }) else {
            return std::ptr::null();
        };
        let filter = config.compiled().map(|compiled| {
            if config.upstream {
                Filter::upstream(compiled)
            } else {
                Filter::listener(compiled)
            }
        });
        let stream = Stream {
            config: Arc::clone(config),
            envoy,
            done: false,
            filter,
            request_body_size: 0,
            answering: false,
            broken: false,
        };
        Box::into_raw(Box::new(stream)) as *const c_void
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_destroy(stream: *const c_void) {
    if stream.is_null() {
        return;
    }
    // SAFETY: made by `Box::into_raw` in filter_new, destroyed once.
    let mut stream = unsafe { Box::from_raw(stream as *mut Stream) };
    // An upstream attempt that was reset, refused or timed out ends here
    // without `stream_complete`: its end is recorded now, while Envoy's
    // side of the stream still exists.
    let envoy = stream.envoy;
    stream.complete(envoy);
    guard("stream destruction", (), || drop(stream));
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    envoy: *mut c_void,
    stream: *const c_void,
    end_of_stream: bool,
) -> u32 {
    // SAFETY: see `Stream::from`.
    let Some(stream) = (unsafe { Stream::from(stream) }) else {
        return abi::HEADERS_CONTINUE;
    };
    if stream.filter.is_none() && !stream.broken {
        guard("an unconfigured reply", (), || unconfigured(envoy));
        return abi::HEADERS_STOP_ITERATION;
    }
    stream.run(
        envoy,
        "request headers",
        abi::HEADERS_STOP_ITERATION,
        |f, host| headers_status(f.on_request_headers(host, end_of_stream)),
    )
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    envoy: *mut c_void,
    stream: *const c_void,
    end_of_stream: bool,
) -> u32 {
    // SAFETY: see `Stream::from`.
    let Some(stream) = (unsafe { Stream::from(stream) }) else {
        return abi::BODY_CONTINUE;
    };
    let size = body_so_far(envoy, true);
    stream.request_body_size = size;
    stream.run(
        envoy,
        "the request body",
        abi::BODY_STOP_ITERATION_NO_BUFFER,
        |f, host| body_status(f.on_request_body(host, size, end_of_stream)),
    )
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    envoy: *mut c_void,
    stream: *const c_void,
) -> u32 {
    // SAFETY: see `Stream::from`.
    let Some(stream) = (unsafe { Stream::from(stream) }) else {
        return abi::TRAILERS_CONTINUE;
    };
    let size = stream.request_body_size;
    stream.run(
        envoy,
        "request trailers",
        abi::TRAILERS_STOP_ITERATION,
        |f, host| match f.on_request_trailers(host, size) {
            Flow::Continue => abi::TRAILERS_CONTINUE,
            Flow::Pause => abi::TRAILERS_STOP_ITERATION,
        },
    )
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    envoy: *mut c_void,
    stream: *const c_void,
    end_of_stream: bool,
) -> u32 {
    // SAFETY: see `Stream::from`.
    let Some(stream) = (unsafe { Stream::from(stream) }) else {
        return abi::HEADERS_CONTINUE;
    };
    let status = stream.run(
        envoy,
        "response headers",
        abi::HEADERS_STOP_ITERATION,
        |f, host| headers_status(f.on_response_headers(host, end_of_stream)),
    );
    stream.answering = status == abi::HEADERS_CONTINUE;
    status
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    envoy: *mut c_void,
    stream: *const c_void,
    end_of_stream: bool,
) -> u32 {
    // SAFETY: see `Stream::from`.
    let Some(stream) = (unsafe { Stream::from(stream) }) else {
        return abi::BODY_CONTINUE;
    };
    // Response headers held until now leave with this body.
    stream.answering = true;
    let size = body_so_far(envoy, false);
    stream.run(
        envoy,
        "the response body",
        abi::BODY_STOP_ITERATION_NO_BUFFER,
        |f, host| body_status(f.on_response_body(host, size, end_of_stream)),
    )
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    _envoy: *mut c_void,
    _stream: *const c_void,
) -> u32 {
    abi::TRAILERS_CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    envoy: *mut c_void,
    stream: *const c_void,
) {
    // SAFETY: see `Stream::from`.
    let Some(stream) = (unsafe { Stream::from(stream) }) else {
        return;
    };
    stream.complete(envoy);
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    envoy: *mut c_void,
    stream: *const c_void,
    id: u64,
    result: u32,
    headers: *mut EnvoyHeader,
    headers_size: usize,
    chunks: *mut EnvoyBuffer,
    chunks_size: usize,
) {
    // SAFETY: see `Stream::from`.
    let Some(stream) = (unsafe { Stream::from(stream) }) else {
        return;
    };
    stream.run(envoy, "a call's answer", (), |f, host| {
        // SAFETY: the answer's buffers, valid during this hook.
        let answer = unsafe { callout::answer(result, headers, headers_size, chunks, chunks_size) };
        match u32::try_from(id) {
            Ok(id) => f.on_callout(host, id, answer),
            Err(_) => log::warn!("an answer came for call {id}, which nobody waits for"),
        }
    })
}

// Hooks this filter has no use for; Envoy requires them all.

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    _envoy: *mut c_void,
    _stream: *const c_void,
    _event: u64,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _envoy: *mut c_void,
    _stream: *const c_void,
    _id: u64,
    _headers: *mut EnvoyHeader,
    _size: usize,
    _end: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _envoy: *mut c_void,
    _stream: *const c_void,
    _id: u64,
    _data: *const EnvoyBuffer,
    _count: usize,
    _end: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    _envoy: *mut c_void,
    _stream: *const c_void,
    _id: u64,
    _trailers: *mut EnvoyHeader,
    _size: usize,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
    _envoy: *mut c_void,
    _stream: *const c_void,
    _id: u64,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
    _envoy: *mut c_void,
    _stream: *const c_void,
    _id: u64,
    _reason: u32,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    _envoy: *mut c_void,
    _stream: *const c_void,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    _envoy: *mut c_void,
    _stream: *const c_void,
) {
}

// The exports match the ABI's hook types.
const _: abi::OnProgramInit = envoy_dynamic_module_on_program_init;
const _: abi::OnHttpFilterConfigNew = envoy_dynamic_module_on_http_filter_config_new;
const _: abi::OnHttpFilterConfigDestroy = envoy_dynamic_module_on_http_filter_config_destroy;
const _: abi::OnHttpFilterNew = envoy_dynamic_module_on_http_filter_new;
const _: abi::OnHttpFilterDestroy = envoy_dynamic_module_on_http_filter_destroy;
const _: abi::OnHttpFilterRequestHeaders = envoy_dynamic_module_on_http_filter_request_headers;
const _: abi::OnHttpFilterRequestBody = envoy_dynamic_module_on_http_filter_request_body;
const _: abi::OnHttpFilterRequestTrailers = envoy_dynamic_module_on_http_filter_request_trailers;
const _: abi::OnHttpFilterResponseHeaders = envoy_dynamic_module_on_http_filter_response_headers;
const _: abi::OnHttpFilterResponseBody = envoy_dynamic_module_on_http_filter_response_body;
const _: abi::OnHttpFilterResponseTrailers = envoy_dynamic_module_on_http_filter_response_trailers;
const _: abi::OnHttpFilterStreamComplete = envoy_dynamic_module_on_http_filter_stream_complete;
const _: abi::OnHttpFilterHttpCalloutDone = envoy_dynamic_module_on_http_filter_http_callout_done;
const _: abi::OnHttpFilterScheduled = envoy_dynamic_module_on_http_filter_scheduled;
const _: abi::OnHttpFilterConfigScheduled = envoy_dynamic_module_on_http_filter_config_scheduled;
const _: abi::OnHttpFilterConfigHttpCalloutDone =
    envoy_dynamic_module_on_http_filter_config_http_callout_done;
const _: abi::OnHttpFilterHttpStreamHeaders =
    envoy_dynamic_module_on_http_filter_http_stream_headers;
const _: abi::OnHttpFilterHttpStreamData = envoy_dynamic_module_on_http_filter_http_stream_data;
const _: abi::OnHttpFilterHttpStreamTrailers =
    envoy_dynamic_module_on_http_filter_http_stream_trailers;
const _: abi::OnHttpFilterHttpStreamComplete =
    envoy_dynamic_module_on_http_filter_http_stream_complete;
const _: abi::OnHttpFilterHttpStreamReset = envoy_dynamic_module_on_http_filter_http_stream_reset;
const _: abi::OnHttpFilterDownstreamWatermark =
    envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark;
const _: abi::OnHttpFilterDownstreamWatermark =
    envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark;
