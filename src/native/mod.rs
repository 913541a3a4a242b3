//! The Envoy dynamic-module adapter: the same gateway as a native shared
//! library (`libmeshllm.so`) loaded by Envoy's `dynamic_modules` HTTP filter,
//! as a listener filter (`filter_name: meshllm`) and as an upstream filter
//! (`filter_name: meshllm.upstream`).
//!
//! Only this folder touches the module ABI (`abi.rs`, a hand-written
//! binding of the functions used). What the Wasm build keeps in proxy-wasm
//! shared data lives in ordinary process memory here (`shared.rs`); its
//! root context's work — detached calls and the lease timer — runs on
//! Envoy's main thread through a config scheduler (`config.rs`, `timer.rs`);
//! metrics are labelled natively (`metrics.rs`).

use std::ffi::c_void;

mod abi;
mod callout;
mod config;
mod entry;
mod host;
mod metrics;
mod node;
pub mod shared;
mod timer;

/// The module ABI this build speaks (Envoy 1.40).
pub const ABI_VERSION_TEXT: &str = "v0.2.0";

/// A pointer to an Envoy object that the module holds across threads.
/// Envoy's config objects outlive the module's, and the calls made through
/// them from any thread (metric updates, scheduler commits) are the ones
/// Envoy documents as thread-safe.
#[derive(Clone, Copy, Debug)]
pub struct EnvoyPtr(pub *mut c_void);

// SAFETY: see above; stream pointers are only used on their own worker.
unsafe impl Send for EnvoyPtr {}
unsafe impl Sync for EnvoyPtr {}

struct EnvoyLogger;
static LOGGER: EnvoyLogger = EnvoyLogger;

impl log::Log for EnvoyLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        // SAFETY: a plain query of Envoy's log level.
        unsafe { abi::envoy_dynamic_module_callback_log_enabled(level(metadata.level())) }
    }
    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let message = record.args().to_string();
        // SAFETY: Envoy copies the message during the call.
        unsafe {
            abi::envoy_dynamic_module_callback_log(
                level(record.level()),
                abi::envoy_dynamic_module_type_module_buffer::from_bytes(message.as_bytes()),
            )
        }
    }
    fn flush(&self) {}
}

fn level(level: log::Level) -> u32 {
    match level {
        log::Level::Error => abi::LOG_ERROR,
        log::Level::Warn => abi::LOG_WARN,
        log::Level::Info => abi::LOG_INFO,
        log::Level::Debug => abi::LOG_DEBUG,
        log::Level::Trace => abi::LOG_TRACE,
    }
}

/// Logs through Envoy, and sends panic messages there too (a panic is
/// caught at the entry point, but its message and place go to the log).
fn install_logger() {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(log::LevelFilter::Info);
    std::panic::set_hook(Box::new(|info| {
        log::error!("meshllm: panic: {info}");
    }));
}

/// Every Envoy function the module calls, checked at load: a module built
/// for another Envoy refuses to load with their names instead of failing
/// later.
const CALLBACKS: &[&str] = &[
    "envoy_dynamic_module_callback_log",
    "envoy_dynamic_module_callback_log_enabled",
    "envoy_dynamic_module_callback_http_filter_config_define_counter",
    "envoy_dynamic_module_callback_http_filter_config_define_gauge",
    "envoy_dynamic_module_callback_http_filter_config_define_histogram",
    "envoy_dynamic_module_callback_http_filter_config_increment_counter",
    "envoy_dynamic_module_callback_http_filter_config_set_gauge",
    "envoy_dynamic_module_callback_http_filter_config_record_histogram_value",
    "envoy_dynamic_module_callback_http_get_header",
    "envoy_dynamic_module_callback_http_get_headers_size",
    "envoy_dynamic_module_callback_http_get_headers",
    "envoy_dynamic_module_callback_http_set_header",
    "envoy_dynamic_module_callback_http_send_response",
    "envoy_dynamic_module_callback_http_get_body_size",
    "envoy_dynamic_module_callback_http_get_body_chunks",
    "envoy_dynamic_module_callback_http_get_body_chunks_size",
    "envoy_dynamic_module_callback_http_append_body",
    "envoy_dynamic_module_callback_http_drain_body",
    "envoy_dynamic_module_callback_http_received_buffered_request_body",
    "envoy_dynamic_module_callback_http_received_buffered_response_body",
    "envoy_dynamic_module_callback_http_set_dynamic_metadata_string",
    "envoy_dynamic_module_callback_http_get_metadata_string",
    "envoy_dynamic_module_callback_http_filter_get_attribute_string",
    "envoy_dynamic_module_callback_http_filter_continue_decoding",
    "envoy_dynamic_module_callback_http_filter_continue_encoding",
    "envoy_dynamic_module_callback_http_filter_reset_stream",
    "envoy_dynamic_module_callback_http_clear_route_cache",
    "envoy_dynamic_module_callback_http_filter_http_callout",
    "envoy_dynamic_module_callback_http_filter_config_http_callout",
    "envoy_dynamic_module_callback_http_filter_config_scheduler_new",
    "envoy_dynamic_module_callback_http_filter_config_scheduler_commit",
    "envoy_dynamic_module_callback_http_filter_config_scheduler_delete",
];

extern "C" {
    fn dlsym(handle: *mut c_void, symbol: *const std::ffi::c_char) -> *mut c_void;
}

/// The callbacks this Envoy does not export.
fn missing_callbacks() -> Vec<&'static str> {
    CALLBACKS
        .iter()
        .copied()
        .filter(|name| {
            let Ok(symbol) = std::ffi::CString::new(*name) else {
                return true;
            };
            // SAFETY: RTLD_DEFAULT (null) searches the process's symbols.
            unsafe { dlsym(std::ptr::null_mut(), symbol.as_ptr()).is_null() }
        })
        .collect()
}
