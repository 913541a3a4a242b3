//! Minimal hand-written binding to the Envoy dynamic modules C ABI, HTTP filter subset.
//!
//! Source of the signatures: `source/extensions/dynamic_modules/abi/abi.h` in envoyproxy/envoy
//! (stored version declares ENVOY_DYNAMIC_MODULES_ABI_VERSION "v0.1.0"; Envoy 1.40.0 is "v0.2.0"
//! and the header promises v0.1.y is compatible with v0.2.x). Every `extern "C"` symbol below
//! was checked against `nm -D --defined-only <envoy 1.40.0>`.
//!
//! Conventions:
//! * C enums are passed as plain `u32` type aliases + `pub const`s (a C enum is `int`-sized on
//!   x86-64/aarch64 Linux; never transmute an unknown value into a Rust enum).
//! * `bool` is C `_Bool`; `size_t` is `usize`.
//! * "envoy_buffer"s are owned by Envoy (see NOTES.md for how long they live); "module_buffer"s
//!   are owned by the module and only need to live for the duration of the call.
#![allow(
    non_camel_case_types,
    non_upper_case_globals,
    dead_code,
    clippy::upper_case_acronyms
)]

use core::ffi::{c_char, c_void};

// ============================================================================================
// Common types
// ============================================================================================

/// The string the module returns from `envoy_dynamic_module_on_program_init`.
pub const ABI_VERSION: &[u8] = b"v0.2.0\0";

pub type envoy_dynamic_module_type_abi_version_module_ptr = *const c_char;
pub type envoy_dynamic_module_type_buffer_module_ptr = *const c_char;
pub type envoy_dynamic_module_type_buffer_envoy_ptr = *const c_char;

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct envoy_dynamic_module_type_envoy_buffer {
    pub ptr: envoy_dynamic_module_type_buffer_envoy_ptr,
    pub length: usize,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct envoy_dynamic_module_type_module_buffer {
    pub ptr: envoy_dynamic_module_type_buffer_module_ptr,
    pub length: usize,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct envoy_dynamic_module_type_module_http_header {
    pub key_ptr: envoy_dynamic_module_type_buffer_module_ptr,
    pub key_length: usize,
    pub value_ptr: envoy_dynamic_module_type_buffer_module_ptr,
    pub value_length: usize,
}

/// Used by `http_set_dynamic_metadata_string_batch`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct envoy_dynamic_module_type_module_key_value_pair {
    pub key_ptr: envoy_dynamic_module_type_buffer_module_ptr,
    pub key_length: usize,
    pub value_ptr: envoy_dynamic_module_type_buffer_module_ptr,
    pub value_length: usize,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct envoy_dynamic_module_type_envoy_http_header {
    pub key_ptr: envoy_dynamic_module_type_buffer_envoy_ptr,
    pub key_length: usize,
    pub value_ptr: envoy_dynamic_module_type_buffer_envoy_ptr,
    pub value_length: usize,
}

// --- envoy_dynamic_module_type_http_header_type
pub type envoy_dynamic_module_type_http_header_type = u32;
pub const HEADER_TYPE_REQUEST_HEADER: u32 = 0;
pub const HEADER_TYPE_REQUEST_TRAILER: u32 = 1;
pub const HEADER_TYPE_RESPONSE_HEADER: u32 = 2;
pub const HEADER_TYPE_RESPONSE_TRAILER: u32 = 3;

// --- envoy_dynamic_module_type_log_level
pub type envoy_dynamic_module_type_log_level = u32;
pub const LOG_TRACE: u32 = 0;
pub const LOG_DEBUG: u32 = 1;
pub const LOG_INFO: u32 = 2;
pub const LOG_WARN: u32 = 3;
pub const LOG_ERROR: u32 = 4;
pub const LOG_CRITICAL: u32 = 5;
pub const LOG_OFF: u32 = 6;

// --- envoy_dynamic_module_type_http_callout_init_result
pub type envoy_dynamic_module_type_http_callout_init_result = u32;
pub const CALLOUT_INIT_SUCCESS: u32 = 0;
pub const CALLOUT_INIT_MISSING_REQUIRED_HEADERS: u32 = 1; // :path, :method or host missing
pub const CALLOUT_INIT_CLUSTER_NOT_FOUND: u32 = 2;
pub const CALLOUT_INIT_DUPLICATE_CALLOUT_ID: u32 = 3; // legacy (ids are now assigned by Envoy)
pub const CALLOUT_INIT_CANNOT_CREATE_REQUEST: u32 = 4; // e.g. no healthy host

// --- envoy_dynamic_module_type_http_callout_result
pub type envoy_dynamic_module_type_http_callout_result = u32;
pub const CALLOUT_SUCCESS: u32 = 0;
pub const CALLOUT_RESET: u32 = 1; // includes timeouts / connection failures
pub const CALLOUT_EXCEED_RESPONSE_BUFFER_LIMIT: u32 = 2;

// --- envoy_dynamic_module_type_http_stream_reset_reason (streamable callouts)
pub type envoy_dynamic_module_type_http_stream_reset_reason = u32;
pub const STREAM_RESET_CONNECTION_FAILURE: u32 = 0;
pub const STREAM_RESET_CONNECTION_TERMINATION: u32 = 1;
pub const STREAM_RESET_LOCAL_RESET: u32 = 2;
pub const STREAM_RESET_LOCAL_REFUSED_STREAM_RESET: u32 = 3;
pub const STREAM_RESET_OVERFLOW: u32 = 4;
pub const STREAM_RESET_REMOTE_RESET: u32 = 5;
pub const STREAM_RESET_REMOTE_REFUSED_STREAM_RESET: u32 = 6;
pub const STREAM_RESET_PROTOCOL_ERROR: u32 = 7;

// --- envoy_dynamic_module_type_metrics_result
pub type envoy_dynamic_module_type_metrics_result = u32;
pub const METRICS_SUCCESS: u32 = 0;
pub const METRICS_METRIC_NOT_FOUND: u32 = 1;
pub const METRICS_INVALID_LABELS: u32 = 2; // label_values_length != number of label names
pub const METRICS_FROZEN: u32 = 3; // define_* called after on_http_filter_config_new returned

// --- envoy_dynamic_module_type_metadata_source (no Listener source exists)
pub type envoy_dynamic_module_type_metadata_source = u32;
pub const METADATA_SOURCE_DYNAMIC: u32 = 0; // stream dynamic metadata
pub const METADATA_SOURCE_ROUTE: u32 = 1;
pub const METADATA_SOURCE_CLUSTER: u32 = 2;
pub const METADATA_SOURCE_HOST: u32 = 3; // LbEndpoint metadata of the selected upstream host
pub const METADATA_SOURCE_HOST_LOCALITY: u32 = 4; // LocalityLbEndpoints metadata

// --- envoy_dynamic_module_type_attribute_id (names are the CEL attribute paths)
pub type envoy_dynamic_module_type_attribute_id = u32;
pub const ATTR_REQUEST_PATH: u32 = 0; // request.path
pub const ATTR_REQUEST_URL_PATH: u32 = 1; // request.url_path
pub const ATTR_REQUEST_HOST: u32 = 2; // request.host
pub const ATTR_REQUEST_SCHEME: u32 = 3; // request.scheme
pub const ATTR_REQUEST_METHOD: u32 = 4; // request.method
pub const ATTR_REQUEST_HEADERS: u32 = 5; // request.headers
pub const ATTR_REQUEST_REFERER: u32 = 6; // request.referer
pub const ATTR_REQUEST_USER_AGENT: u32 = 7; // request.useragent
pub const ATTR_REQUEST_TIME: u32 = 8; // request.time
pub const ATTR_REQUEST_ID: u32 = 9; // request.id
pub const ATTR_REQUEST_PROTOCOL: u32 = 10; // request.protocol
pub const ATTR_REQUEST_QUERY: u32 = 11; // request.query
pub const ATTR_REQUEST_DURATION: u32 = 12; // request.duration
pub const ATTR_REQUEST_SIZE: u32 = 13; // request.size
pub const ATTR_REQUEST_TOTAL_SIZE: u32 = 14; // request.total_size
pub const ATTR_RESPONSE_CODE: u32 = 15; // response.code
pub const ATTR_RESPONSE_CODE_DETAILS: u32 = 16; // response.code_details
pub const ATTR_RESPONSE_FLAGS: u32 = 17; // response.flags
pub const ATTR_RESPONSE_GRPC_STATUS: u32 = 18; // response.grpc_status
pub const ATTR_RESPONSE_HEADERS: u32 = 19; // response.headers
pub const ATTR_RESPONSE_TRAILERS: u32 = 20; // response.trailers
pub const ATTR_RESPONSE_SIZE: u32 = 21; // response.size
pub const ATTR_RESPONSE_TOTAL_SIZE: u32 = 22; // response.total_size
pub const ATTR_RESPONSE_BACKEND_LATENCY: u32 = 23; // response.backend_latency
pub const ATTR_SOURCE_ADDRESS: u32 = 24; // source.address
pub const ATTR_SOURCE_PORT: u32 = 25; // source.port
pub const ATTR_DESTINATION_ADDRESS: u32 = 26; // destination.address
pub const ATTR_DESTINATION_PORT: u32 = 27; // destination.port
pub const ATTR_CONNECTION_ID: u32 = 28; // connection.id
pub const ATTR_CONNECTION_MTLS: u32 = 29; // connection.mtls
pub const ATTR_CONNECTION_REQUESTED_SERVER_NAME: u32 = 30; // connection.requested_server_name
pub const ATTR_CONNECTION_TLS_VERSION: u32 = 31; // connection.tls_version
pub const ATTR_CONNECTION_SUBJECT_LOCAL_CERTIFICATE: u32 = 32;
pub const ATTR_CONNECTION_SUBJECT_PEER_CERTIFICATE: u32 = 33;
pub const ATTR_CONNECTION_DNS_SAN_LOCAL_CERTIFICATE: u32 = 34;
pub const ATTR_CONNECTION_DNS_SAN_PEER_CERTIFICATE: u32 = 35;
pub const ATTR_CONNECTION_URI_SAN_LOCAL_CERTIFICATE: u32 = 36;
pub const ATTR_CONNECTION_URI_SAN_PEER_CERTIFICATE: u32 = 37; // connection.uri_san_peer_certificate
pub const ATTR_CONNECTION_SHA256_PEER_CERTIFICATE_DIGEST: u32 = 38;
pub const ATTR_CONNECTION_TRANSPORT_FAILURE_REASON: u32 = 39;
pub const ATTR_CONNECTION_TERMINATION_DETAILS: u32 = 40;
pub const ATTR_UPSTREAM_ADDRESS: u32 = 41; // upstream.address
pub const ATTR_UPSTREAM_PORT: u32 = 42; // upstream.port
pub const ATTR_UPSTREAM_TLS_VERSION: u32 = 43;
pub const ATTR_UPSTREAM_SUBJECT_LOCAL_CERTIFICATE: u32 = 44;
pub const ATTR_UPSTREAM_SUBJECT_PEER_CERTIFICATE: u32 = 45;
pub const ATTR_UPSTREAM_DNS_SAN_LOCAL_CERTIFICATE: u32 = 46;
pub const ATTR_UPSTREAM_DNS_SAN_PEER_CERTIFICATE: u32 = 47;
pub const ATTR_UPSTREAM_URI_SAN_LOCAL_CERTIFICATE: u32 = 48;
pub const ATTR_UPSTREAM_URI_SAN_PEER_CERTIFICATE: u32 = 49;
pub const ATTR_UPSTREAM_SHA256_PEER_CERTIFICATE_DIGEST: u32 = 50;
pub const ATTR_UPSTREAM_LOCAL_ADDRESS: u32 = 51; // upstream.local_address
pub const ATTR_UPSTREAM_TRANSPORT_FAILURE_REASON: u32 = 52; // upstream.transport_failure_reason
pub const ATTR_UPSTREAM_REQUEST_ATTEMPT_COUNT: u32 = 53;
pub const ATTR_UPSTREAM_CX_POOL_READY_DURATION: u32 = 54;
pub const ATTR_UPSTREAM_LOCALITY: u32 = 55;
pub const ATTR_XDS_NODE: u32 = 56; // xds.node (a proto; string getter likely unsupported)
pub const ATTR_XDS_CLUSTER_NAME: u32 = 57; // xds.cluster_name
pub const ATTR_XDS_CLUSTER_METADATA: u32 = 58; // xds.cluster_metadata
pub const ATTR_XDS_LISTENER_DIRECTION: u32 = 59; // xds.listener_direction (int)
pub const ATTR_XDS_LISTENER_METADATA: u32 = 60; // xds.listener_metadata
pub const ATTR_XDS_ROUTE_NAME: u32 = 61; // xds.route_name
pub const ATTR_XDS_ROUTE_METADATA: u32 = 62;
pub const ATTR_XDS_VIRTUAL_HOST_NAME: u32 = 63;
pub const ATTR_XDS_VIRTUAL_HOST_METADATA: u32 = 64;
pub const ATTR_XDS_UPSTREAM_HOST_METADATA: u32 = 65;
pub const ATTR_XDS_FILTER_CHAIN_NAME: u32 = 66; // xds.filter_chain_name
pub const ATTR_HEALTH_CHECK: u32 = 67; // health_check (newest stored header only; appended last)

// =============================================================================================
// HTTP filter types
// =============================================================================================

/// Envoy's DynamicModuleHttpFilterConfig (passed to config_new, used for metrics/callouts).
pub type envoy_dynamic_module_type_http_filter_config_envoy_ptr = *mut c_void;
/// The module's config object (returned from config_new; null = reject the config).
pub type envoy_dynamic_module_type_http_filter_config_module_ptr = *const c_void;
pub type envoy_dynamic_module_type_http_filter_per_route_config_module_ptr = *const c_void;
/// Envoy's DynamicModuleHttpFilter (one per stream; valid until on_http_filter_destroy).
pub type envoy_dynamic_module_type_http_filter_envoy_ptr = *mut c_void;
/// The module's per-stream filter object (returned from on_http_filter_new).
pub type envoy_dynamic_module_type_http_filter_module_ptr = *const c_void;
/// Allocated by Envoy, owned by the module: must be freed with *_scheduler_delete.
pub type envoy_dynamic_module_type_http_filter_scheduler_module_ptr = *mut c_void;
pub type envoy_dynamic_module_type_http_filter_config_scheduler_module_ptr = *mut c_void;

// --- envoy_dynamic_module_type_http_body_type
pub type envoy_dynamic_module_type_http_body_type = u32;
pub const BODY_RECEIVED_REQUEST: u32 = 0; // the chunk passed to the current on_request_body
pub const BODY_BUFFERED_REQUEST: u32 = 1; // decoder_callbacks->decodingBuffer()
pub const BODY_RECEIVED_RESPONSE: u32 = 2;
pub const BODY_BUFFERED_RESPONSE: u32 = 3; // encoder_callbacks->encodingBuffer()

// --- statuses returned by the event hooks (cast 1:1 to Envoy's Filter*Status)
pub type envoy_dynamic_module_type_on_http_filter_request_headers_status = u32;
pub type envoy_dynamic_module_type_on_http_filter_response_headers_status = u32;
pub const HEADERS_CONTINUE: u32 = 0;
pub const HEADERS_STOP_ITERATION: u32 = 1;
pub const HEADERS_CONTINUE_AND_DONT_END_STREAM: u32 = 2;
pub const HEADERS_STOP_ALL_ITERATION_AND_BUFFER: u32 = 3;
pub const HEADERS_STOP_ALL_ITERATION_AND_WATERMARK: u32 = 4;

pub type envoy_dynamic_module_type_on_http_filter_request_body_status = u32;
pub type envoy_dynamic_module_type_on_http_filter_response_body_status = u32;
pub const BODY_CONTINUE: u32 = 0;
pub const BODY_STOP_ITERATION_AND_BUFFER: u32 = 1;
pub const BODY_STOP_ITERATION_AND_WATERMARK: u32 = 2;
pub const BODY_STOP_ITERATION_NO_BUFFER: u32 = 3;

pub type envoy_dynamic_module_type_on_http_filter_request_trailers_status = u32;
pub type envoy_dynamic_module_type_on_http_filter_response_trailers_status = u32;
pub const TRAILERS_CONTINUE: u32 = 0;
pub const TRAILERS_STOP_ITERATION: u32 = 1;

pub type envoy_dynamic_module_type_on_http_filter_local_reply_status = u32;
pub const LOCAL_REPLY_CONTINUE: u32 = 0;
pub const LOCAL_REPLY_CONTINUE_AND_RESET_STREAM: u32 = 1;

// --- envoy_dynamic_module_type_http_filter_stream_reset_reason (http_filter_reset_stream)
pub type envoy_dynamic_module_type_http_filter_stream_reset_reason = u32;
pub const FILTER_RESET_LOCAL_RESET: u32 = 0;
pub const FILTER_RESET_LOCAL_REFUSED_STREAM_RESET: u32 = 1;

// =============================================================================================
// Callbacks (implemented by Envoy, called by the module)
// =============================================================================================

extern "C" {
    // ---------------------------------------------------------------- logging / process
    pub fn envoy_dynamic_module_callback_log(
        level: envoy_dynamic_module_type_log_level,
        message: envoy_dynamic_module_type_module_buffer,
    );
    pub fn envoy_dynamic_module_callback_log_enabled(
        level: envoy_dynamic_module_type_log_level,
    ) -> bool;
    /// Number of worker threads. Main thread only (e.g. in on_program_init or config_new).
    pub fn envoy_dynamic_module_callback_get_concurrency() -> u32;
    /// Main thread only.
    pub fn envoy_dynamic_module_callback_is_validation_mode() -> bool;

    // ---------------------------------------------------------------- metrics (config-level)
    /// Only succeeds while on_http_filter_config_new runs; afterwards returns METRICS_FROZEN.
    pub fn envoy_dynamic_module_callback_http_filter_config_define_counter(
        filter_config_envoy_ptr: envoy_dynamic_module_type_http_filter_config_envoy_ptr,
        name: envoy_dynamic_module_type_module_buffer,
        label_names: *mut envoy_dynamic_module_type_module_buffer,
        label_names_length: usize,
        counter_id_ptr: *mut usize,
    ) -> envoy_dynamic_module_type_metrics_result;
    pub fn envoy_dynamic_module_callback_http_filter_config_define_gauge(
        filter_config_envoy_ptr: envoy_dynamic_module_type_http_filter_config_envoy_ptr,
        name: envoy_dynamic_module_type_module_buffer,
        label_names: *mut envoy_dynamic_module_type_module_buffer,
        label_names_length: usize,
        gauge_id_ptr: *mut usize,
    ) -> envoy_dynamic_module_type_metrics_result;
    pub fn envoy_dynamic_module_callback_http_filter_config_define_histogram(
        filter_config_envoy_ptr: envoy_dynamic_module_type_http_filter_config_envoy_ptr,
        name: envoy_dynamic_module_type_module_buffer,
        label_names: *mut envoy_dynamic_module_type_module_buffer,
        label_names_length: usize,
        histogram_id_ptr: *mut usize,
    ) -> envoy_dynamic_module_type_metrics_result;

    // ---------------------------------------------------------------- metrics (filter-level)
    pub fn envoy_dynamic_module_callback_http_filter_increment_counter(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        id: usize,
        label_values: *mut envoy_dynamic_module_type_module_buffer,
        label_values_length: usize,
        value: u64,
    ) -> envoy_dynamic_module_type_metrics_result;
    pub fn envoy_dynamic_module_callback_http_filter_increment_gauge(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        id: usize,
        label_values: *mut envoy_dynamic_module_type_module_buffer,
        label_values_length: usize,
        value: u64,
    ) -> envoy_dynamic_module_type_metrics_result;
    pub fn envoy_dynamic_module_callback_http_filter_decrement_gauge(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        id: usize,
        label_values: *mut envoy_dynamic_module_type_module_buffer,
        label_values_length: usize,
        value: u64,
    ) -> envoy_dynamic_module_type_metrics_result;
    pub fn envoy_dynamic_module_callback_http_filter_set_gauge(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        id: usize,
        label_values: *mut envoy_dynamic_module_type_module_buffer,
        label_values_length: usize,
        value: u64,
    ) -> envoy_dynamic_module_type_metrics_result;
    pub fn envoy_dynamic_module_callback_http_filter_record_histogram_value(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        id: usize,
        label_values: *mut envoy_dynamic_module_type_module_buffer,
        label_values_length: usize,
        value: u64,
    ) -> envoy_dynamic_module_type_metrics_result;

    // ------------------------------------------- metrics (config-level use, no stream needed)
    pub fn envoy_dynamic_module_callback_http_filter_config_increment_counter(
        filter_config_envoy_ptr: envoy_dynamic_module_type_http_filter_config_envoy_ptr,
        id: usize,
        label_values: *mut envoy_dynamic_module_type_module_buffer,
        label_values_length: usize,
        value: u64,
    ) -> envoy_dynamic_module_type_metrics_result;
    pub fn envoy_dynamic_module_callback_http_filter_config_increment_gauge(
        filter_config_envoy_ptr: envoy_dynamic_module_type_http_filter_config_envoy_ptr,
        id: usize,
        label_values: *mut envoy_dynamic_module_type_module_buffer,
        label_values_length: usize,
        value: u64,
    ) -> envoy_dynamic_module_type_metrics_result;
    pub fn envoy_dynamic_module_callback_http_filter_config_decrement_gauge(
        filter_config_envoy_ptr: envoy_dynamic_module_type_http_filter_config_envoy_ptr,
        id: usize,
        label_values: *mut envoy_dynamic_module_type_module_buffer,
        label_values_length: usize,
        value: u64,
    ) -> envoy_dynamic_module_type_metrics_result;
    pub fn envoy_dynamic_module_callback_http_filter_config_set_gauge(
        filter_config_envoy_ptr: envoy_dynamic_module_type_http_filter_config_envoy_ptr,
        id: usize,
        label_values: *mut envoy_dynamic_module_type_module_buffer,
        label_values_length: usize,
        value: u64,
    ) -> envoy_dynamic_module_type_metrics_result;
    pub fn envoy_dynamic_module_callback_http_filter_config_record_histogram_value(
        filter_config_envoy_ptr: envoy_dynamic_module_type_http_filter_config_envoy_ptr,
        id: usize,
        label_values: *mut envoy_dynamic_module_type_module_buffer,
        label_values_length: usize,
        value: u64,
    ) -> envoy_dynamic_module_type_metrics_result;

    // ---------------------------------------------------------------- headers / trailers
    /// Value number `index` of header `key` (keys are lower-cased by Envoy). Returns false when
    /// absent/out of range (result set to {null,0}); `optional_size` (may be null) receives the
    /// number of values for the key.
    pub fn envoy_dynamic_module_callback_http_get_header(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        header_type: envoy_dynamic_module_type_http_header_type,
        key: envoy_dynamic_module_type_module_buffer,
        result_buffer: *mut envoy_dynamic_module_type_envoy_buffer,
        index: usize,
        optional_size: *mut usize,
    ) -> bool;
    /// All values of `key`; `result_buffer` must have room for the count from get_header.
    pub fn envoy_dynamic_module_callback_http_get_header_values(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        header_type: envoy_dynamic_module_type_http_header_type,
        key: envoy_dynamic_module_type_module_buffer,
        result_buffer: *mut envoy_dynamic_module_type_envoy_buffer,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_get_headers_size(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        header_type: envoy_dynamic_module_type_http_header_type,
    ) -> usize;
    /// `result_headers` must have room for get_headers_size entries.
    pub fn envoy_dynamic_module_callback_http_get_headers(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        header_type: envoy_dynamic_module_type_http_header_type,
        result_headers: *mut envoy_dynamic_module_type_envoy_http_header,
    ) -> bool;
    /// Adds one more value (keeps existing values).
    pub fn envoy_dynamic_module_callback_http_add_header(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        header_type: envoy_dynamic_module_type_http_header_type,
        key: envoy_dynamic_module_type_module_buffer,
        value: envoy_dynamic_module_type_module_buffer,
    ) -> bool;
    /// Replaces all values. REMOVE = call this with `value.ptr == null` (there is no
    /// remove_header symbol in 1.40).
    pub fn envoy_dynamic_module_callback_http_set_header(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        header_type: envoy_dynamic_module_type_http_header_type,
        key: envoy_dynamic_module_type_module_buffer,
        value: envoy_dynamic_module_type_module_buffer,
    ) -> bool;

    // ---------------------------------------------------------------- local reply
    /// sendLocalReply(status, body) with extra headers; `details` (may be {null,0}) becomes
    /// %RESPONSE_CODE_DETAILS%.
    pub fn envoy_dynamic_module_callback_http_send_response(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        status_code: u32,
        headers_vector: *mut envoy_dynamic_module_type_module_http_header,
        headers_vector_size: usize,
        body: envoy_dynamic_module_type_module_buffer,
        details: envoy_dynamic_module_type_module_buffer,
    );
    pub fn envoy_dynamic_module_callback_http_send_response_headers(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        headers_vector: *mut envoy_dynamic_module_type_module_http_header,
        headers_vector_size: usize,
        end_stream: bool,
    );
    pub fn envoy_dynamic_module_callback_http_send_response_data(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        data: envoy_dynamic_module_type_module_buffer,
        end_stream: bool,
    );
    pub fn envoy_dynamic_module_callback_http_send_response_trailers(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        trailers_vector: *mut envoy_dynamic_module_type_module_http_header,
        trailers_vector_size: usize,
    );

    // ---------------------------------------------------------------- bodies
    pub fn envoy_dynamic_module_callback_http_get_body_size(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        body_type: envoy_dynamic_module_type_http_body_type,
    ) -> usize;
    /// `result_buffer_vector` must have room for get_body_chunks_size entries.
    pub fn envoy_dynamic_module_callback_http_get_body_chunks(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        body_type: envoy_dynamic_module_type_http_body_type,
        result_buffer_vector: *mut envoy_dynamic_module_type_envoy_buffer,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_get_body_chunks_size(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        body_type: envoy_dynamic_module_type_http_body_type,
    ) -> usize;
    pub fn envoy_dynamic_module_callback_http_append_body(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        body_type: envoy_dynamic_module_type_http_body_type,
        data: envoy_dynamic_module_type_module_buffer,
    ) -> bool;
    /// Drains min(number_of_bytes, size) from the front.
    pub fn envoy_dynamic_module_callback_http_drain_body(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        body_type: envoy_dynamic_module_type_http_body_type,
        number_of_bytes: usize,
    ) -> bool;
    /// True when the chunk being delivered IS an earlier filter's buffered body.
    pub fn envoy_dynamic_module_callback_http_received_buffered_request_body(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_received_buffered_response_body(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_get_buffer_limit(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
    ) -> u64;
    pub fn envoy_dynamic_module_callback_http_set_buffer_limit(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        limit: u64,
    );

    // ---------------------------------------------------------------- metadata
    pub fn envoy_dynamic_module_callback_http_set_dynamic_metadata_number(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        ns: envoy_dynamic_module_type_module_buffer,
        key: envoy_dynamic_module_type_module_buffer,
        value: f64,
    );
    pub fn envoy_dynamic_module_callback_http_set_dynamic_metadata_string(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        ns: envoy_dynamic_module_type_module_buffer,
        key: envoy_dynamic_module_type_module_buffer,
        value: envoy_dynamic_module_type_module_buffer,
    );
    pub fn envoy_dynamic_module_callback_http_set_dynamic_metadata_string_batch(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        ns: envoy_dynamic_module_type_module_buffer,
        entries: *const envoy_dynamic_module_type_module_key_value_pair,
        entries_size: usize,
    );
    pub fn envoy_dynamic_module_callback_http_set_dynamic_metadata_bool(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        ns: envoy_dynamic_module_type_module_buffer,
        key: envoy_dynamic_module_type_module_buffer,
        value: bool,
    );
    pub fn envoy_dynamic_module_callback_http_get_metadata_number(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        metadata_source: envoy_dynamic_module_type_metadata_source,
        ns: envoy_dynamic_module_type_module_buffer,
        key: envoy_dynamic_module_type_module_buffer,
        result: *mut f64,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_get_metadata_string(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        metadata_source: envoy_dynamic_module_type_metadata_source,
        ns: envoy_dynamic_module_type_module_buffer,
        key: envoy_dynamic_module_type_module_buffer,
        result: *mut envoy_dynamic_module_type_envoy_buffer,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_get_metadata_bool(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        metadata_source: envoy_dynamic_module_type_metadata_source,
        ns: envoy_dynamic_module_type_module_buffer,
        key: envoy_dynamic_module_type_module_buffer,
        result: *mut bool,
    ) -> bool;

    // ---------------------------------------------------------------- filter state
    /// Stores a Router::StringAccessor, StateType::ReadOnly, default LifeSpan (FilterChain),
    /// no upstream-connection sharing. Setting the same key twice is an access violation.
    pub fn envoy_dynamic_module_callback_http_set_filter_state_bytes(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        key: envoy_dynamic_module_type_module_buffer,
        value: envoy_dynamic_module_type_module_buffer,
    ) -> bool;
    /// Only reads StringAccessor objects (false for other types; use *_typed for those).
    pub fn envoy_dynamic_module_callback_http_get_filter_state_bytes(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        key: envoy_dynamic_module_type_module_buffer,
        result: *mut envoy_dynamic_module_type_envoy_buffer,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_set_filter_state_typed(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        key: envoy_dynamic_module_type_module_buffer,
        value: envoy_dynamic_module_type_module_buffer,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_get_filter_state_typed(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        key: envoy_dynamic_module_type_module_buffer,
        result: *mut envoy_dynamic_module_type_envoy_buffer,
    ) -> bool;

    // ---------------------------------------------------------------- attributes / misc
    pub fn envoy_dynamic_module_callback_http_filter_get_attribute_string(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        attribute_id: envoy_dynamic_module_type_attribute_id,
        result: *mut envoy_dynamic_module_type_envoy_buffer,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_filter_get_attribute_int(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        attribute_id: envoy_dynamic_module_type_attribute_id,
        result: *mut u64,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_filter_get_attribute_bool(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        attribute_id: envoy_dynamic_module_type_attribute_id,
        result: *mut bool,
    ) -> bool;
    /// Index N parsed from the worker dispatcher name "worker_N".
    pub fn envoy_dynamic_module_callback_http_filter_get_worker_index(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
    ) -> u32;
    pub fn envoy_dynamic_module_callback_http_get_cluster_name(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        result: *mut envoy_dynamic_module_type_envoy_buffer,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_add_custom_flag(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        flag: envoy_dynamic_module_type_module_buffer,
    );
    pub fn envoy_dynamic_module_callback_http_clear_route_cache(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
    );
    pub fn envoy_dynamic_module_callback_get_most_specific_route_config(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
    ) -> envoy_dynamic_module_type_http_filter_per_route_config_module_ptr;

    // ---------------------------------------------------------------- flow control
    pub fn envoy_dynamic_module_callback_http_filter_continue_decoding(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
    );
    pub fn envoy_dynamic_module_callback_http_filter_continue_encoding(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
    );
    pub fn envoy_dynamic_module_callback_http_filter_reset_stream(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        reason: envoy_dynamic_module_type_http_filter_stream_reset_reason,
        details: envoy_dynamic_module_type_module_buffer,
    );

    // ---------------------------------------------------------------- HTTP callouts
    /// One-shot callout from a stream. Envoy assigns `*callout_id_out`; the answer arrives in
    /// envoy_dynamic_module_on_http_filter_http_callout_done on the same worker thread.
    /// `headers` must contain :method, :path and host.
    pub fn envoy_dynamic_module_callback_http_filter_http_callout(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        callout_id_out: *mut u64,
        cluster_name: envoy_dynamic_module_type_module_buffer,
        headers: *mut envoy_dynamic_module_type_module_http_header,
        headers_size: usize,
        body: envoy_dynamic_module_type_module_buffer,
        timeout_milliseconds: u64,
    ) -> envoy_dynamic_module_type_http_callout_init_result;
    /// One-shot callout owned by the filter config (survives the stream); answer arrives in
    /// envoy_dynamic_module_on_http_filter_config_http_callout_done (optional hook).
    pub fn envoy_dynamic_module_callback_http_filter_config_http_callout(
        filter_config_envoy_ptr: envoy_dynamic_module_type_http_filter_config_envoy_ptr,
        callout_id_out: *mut u64,
        cluster_name: envoy_dynamic_module_type_module_buffer,
        headers: *mut envoy_dynamic_module_type_module_http_header,
        headers_size: usize,
        body: envoy_dynamic_module_type_module_buffer,
        timeout_milliseconds: u64,
    ) -> envoy_dynamic_module_type_http_callout_init_result;

    // ---------------------------------------------------------------- schedulers
    pub fn envoy_dynamic_module_callback_http_filter_scheduler_new(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
    ) -> envoy_dynamic_module_type_http_filter_scheduler_module_ptr;
    /// Any thread; runs on_http_filter_scheduled on the filter's worker; no-op once destroyed.
    pub fn envoy_dynamic_module_callback_http_filter_scheduler_commit(
        scheduler_module_ptr: envoy_dynamic_module_type_http_filter_scheduler_module_ptr,
        event_id: u64,
    );
    pub fn envoy_dynamic_module_callback_http_filter_scheduler_delete(
        scheduler_module_ptr: envoy_dynamic_module_type_http_filter_scheduler_module_ptr,
    );
    pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_new(
        filter_config_envoy_ptr: envoy_dynamic_module_type_http_filter_config_envoy_ptr,
    ) -> envoy_dynamic_module_type_http_filter_config_scheduler_module_ptr;
    /// Any thread; runs on_http_filter_config_scheduled on the MAIN thread.
    pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_commit(
        scheduler_module_ptr: envoy_dynamic_module_type_http_filter_config_scheduler_module_ptr,
        event_id: u64,
    );
    pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_delete(
        scheduler_module_ptr: envoy_dynamic_module_type_http_filter_config_scheduler_module_ptr,
    );
}

// =============================================================================================
// Event hooks (implemented and exported by the module, `#[no_mangle] pub extern "C"`)
// =============================================================================================
//
// Envoy resolves these with dlsym when the module is loaded / the filter config is created.
// REQUIRED = config creation fails ("...undefined symbol"/not found) if missing
// (filter_config.cc: RETURN_IF_NOT_OK_REF on each). OPTIONAL = looked up, used if present.
// The REQUIRED/OPTIONAL split is from the newest stored filter_config.cc; the 1.40 binary
// contains the name strings of all of them. Safest: export ALL of them (cheap no-op stubs).
//
// REQUIRED (any module):
//   envoy_dynamic_module_type_abi_version_module_ptr envoy_dynamic_module_on_program_init(void);
//     -> return a pointer to "v0.2.0\0" (static); NULL makes Envoy refuse the module.
//
// REQUIRED (HTTP filter):
//   const void* envoy_dynamic_module_on_http_filter_config_new(
//       void* filter_config_envoy_ptr, envoy_buffer name, envoy_buffer config);   // NULL => config rejected
//   void envoy_dynamic_module_on_http_filter_config_destroy(const void* filter_config_ptr);
//   const void* envoy_dynamic_module_on_http_filter_new(
//       const void* filter_config_ptr, void* filter_envoy_ptr);                    // NULL => stream closed
//   request_headers_status  envoy_dynamic_module_on_http_filter_request_headers(
//       void* filter_envoy_ptr, const void* filter_module_ptr, bool end_of_stream);
//   request_body_status     envoy_dynamic_module_on_http_filter_request_body(
//       void* filter_envoy_ptr, const void* filter_module_ptr, bool end_of_stream);
//   request_trailers_status envoy_dynamic_module_on_http_filter_request_trailers(
//       void* filter_envoy_ptr, const void* filter_module_ptr);
//   response_headers_status envoy_dynamic_module_on_http_filter_response_headers(
//       void* filter_envoy_ptr, const void* filter_module_ptr, bool end_of_stream);
//   response_body_status    envoy_dynamic_module_on_http_filter_response_body(
//       void* filter_envoy_ptr, const void* filter_module_ptr, bool end_of_stream);
//   response_trailers_status envoy_dynamic_module_on_http_filter_response_trailers(
//       void* filter_envoy_ptr, const void* filter_module_ptr);
//   void envoy_dynamic_module_on_http_filter_stream_complete(
//       void* filter_envoy_ptr, const void* filter_module_ptr);   // before destroy and access logs
//   void envoy_dynamic_module_on_http_filter_destroy(const void* filter_module_ptr);
//   void envoy_dynamic_module_on_http_filter_http_callout_done(
//       void* filter_envoy_ptr, const void* filter_module_ptr, uint64_t callout_id,
//       http_callout_result result, envoy_http_header* headers, size_t headers_size,
//       envoy_buffer* body_chunks, size_t body_chunks_size);
//   void envoy_dynamic_module_on_http_filter_http_stream_headers(
//       void* filter_envoy_ptr, const void* filter_module_ptr, uint64_t stream_id,
//       envoy_http_header* headers, size_t headers_size, bool end_stream);
//   void envoy_dynamic_module_on_http_filter_http_stream_data(
//       void* filter_envoy_ptr, const void* filter_module_ptr, uint64_t stream_id,
//       const envoy_buffer* data, size_t data_count, bool end_stream);
//   void envoy_dynamic_module_on_http_filter_http_stream_trailers(
//       void* filter_envoy_ptr, const void* filter_module_ptr, uint64_t stream_id,
//       envoy_http_header* trailers, size_t trailers_size);
//   void envoy_dynamic_module_on_http_filter_http_stream_complete(
//       void* filter_envoy_ptr, const void* filter_module_ptr, uint64_t stream_id);
//   void envoy_dynamic_module_on_http_filter_http_stream_reset(
//       void* filter_envoy_ptr, const void* filter_module_ptr, uint64_t stream_id,
//       http_stream_reset_reason reason);
//   void envoy_dynamic_module_on_http_filter_scheduled(
//       void* filter_envoy_ptr, const void* filter_module_ptr, uint64_t event_id);
//   void envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
//       void* filter_envoy_ptr, const void* filter_module_ptr);
//   void envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
//       void* filter_envoy_ptr, const void* filter_module_ptr);
//
// OPTIONAL (HTTP filter):
//   void envoy_dynamic_module_on_http_filter_config_scheduled(
//       void* filter_config_envoy_ptr, const void* filter_config_ptr, uint64_t event_id);
//   void envoy_dynamic_module_on_http_filter_config_http_callout_done(
//       void* filter_config_envoy_ptr, const void* filter_config_ptr, uint64_t callout_id,
//       http_callout_result result, envoy_http_header* headers, size_t headers_size,
//       envoy_buffer* body_chunks, size_t body_chunks_size);
//   void envoy_dynamic_module_on_http_filter_config_http_stream_headers(
//       void*, const void*, uint64_t stream_id, envoy_http_header* headers, size_t n, bool end_stream);
//   void envoy_dynamic_module_on_http_filter_config_http_stream_data(
//       void*, const void*, uint64_t stream_id, const envoy_buffer* data, size_t n, bool end_stream);
//   void envoy_dynamic_module_on_http_filter_config_http_stream_trailers(
//       void*, const void*, uint64_t stream_id, envoy_http_header* trailers, size_t n);
//   void envoy_dynamic_module_on_http_filter_config_http_stream_complete(
//       void*, const void*, uint64_t stream_id);
//   void envoy_dynamic_module_on_http_filter_config_http_stream_reset(
//       void*, const void*, uint64_t stream_id, http_stream_reset_reason reason);
//   local_reply_status envoy_dynamic_module_on_http_filter_local_reply(
//       void* filter_envoy_ptr, const void* filter_module_ptr, uint32_t response_code,
//       envoy_buffer details, bool reset_imminent);
//
// REQUIRED ONLY IF a route uses a per-route DynamicModuleFilterPerRoute config:
//   const void* envoy_dynamic_module_on_http_filter_per_route_config_new(
//       envoy_buffer name, envoy_buffer config);                                   // NULL => rejected
//   void envoy_dynamic_module_on_http_filter_per_route_config_destroy(const void* config_ptr);
//
// The fn-pointer aliases below let the module compile-check its exports, e.g.
//   const _: OnHttpFilterNew = envoy_dynamic_module_on_http_filter_new;

pub type OnProgramInit = unsafe extern "C" fn() -> envoy_dynamic_module_type_abi_version_module_ptr;
pub type OnHttpFilterConfigNew =
    unsafe extern "C" fn(
        filter_config_envoy_ptr: envoy_dynamic_module_type_http_filter_config_envoy_ptr,
        name: envoy_dynamic_module_type_envoy_buffer,
        config: envoy_dynamic_module_type_envoy_buffer,
    ) -> envoy_dynamic_module_type_http_filter_config_module_ptr;
pub type OnHttpFilterConfigDestroy = unsafe extern "C" fn(
    filter_config_ptr: envoy_dynamic_module_type_http_filter_config_module_ptr,
);
pub type OnHttpFilterPerRouteConfigNew =
    unsafe extern "C" fn(
        name: envoy_dynamic_module_type_envoy_buffer,
        config: envoy_dynamic_module_type_envoy_buffer,
    ) -> envoy_dynamic_module_type_http_filter_per_route_config_module_ptr;
pub type OnHttpFilterPerRouteConfigDestroy = unsafe extern "C" fn(
    filter_config_ptr: envoy_dynamic_module_type_http_filter_per_route_config_module_ptr,
);
pub type OnHttpFilterNew = unsafe extern "C" fn(
    filter_config_ptr: envoy_dynamic_module_type_http_filter_config_module_ptr,
    filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
)
    -> envoy_dynamic_module_type_http_filter_module_ptr;
pub type OnHttpFilterRequestHeaders =
    unsafe extern "C" fn(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        filter_module_ptr: envoy_dynamic_module_type_http_filter_module_ptr,
        end_of_stream: bool,
    ) -> envoy_dynamic_module_type_on_http_filter_request_headers_status;
pub type OnHttpFilterRequestBody =
    unsafe extern "C" fn(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        filter_module_ptr: envoy_dynamic_module_type_http_filter_module_ptr,
        end_of_stream: bool,
    ) -> envoy_dynamic_module_type_on_http_filter_request_body_status;
pub type OnHttpFilterRequestTrailers =
    unsafe extern "C" fn(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        filter_module_ptr: envoy_dynamic_module_type_http_filter_module_ptr,
    ) -> envoy_dynamic_module_type_on_http_filter_request_trailers_status;
pub type OnHttpFilterResponseHeaders =
    unsafe extern "C" fn(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        filter_module_ptr: envoy_dynamic_module_type_http_filter_module_ptr,
        end_of_stream: bool,
    ) -> envoy_dynamic_module_type_on_http_filter_response_headers_status;
pub type OnHttpFilterResponseBody =
    unsafe extern "C" fn(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        filter_module_ptr: envoy_dynamic_module_type_http_filter_module_ptr,
        end_of_stream: bool,
    ) -> envoy_dynamic_module_type_on_http_filter_response_body_status;
pub type OnHttpFilterResponseTrailers =
    unsafe extern "C" fn(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        filter_module_ptr: envoy_dynamic_module_type_http_filter_module_ptr,
    ) -> envoy_dynamic_module_type_on_http_filter_response_trailers_status;
pub type OnHttpFilterStreamComplete = unsafe extern "C" fn(
    filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
    filter_module_ptr: envoy_dynamic_module_type_http_filter_module_ptr,
);
pub type OnHttpFilterDestroy =
    unsafe extern "C" fn(filter_module_ptr: envoy_dynamic_module_type_http_filter_module_ptr);
pub type OnHttpFilterHttpCalloutDone = unsafe extern "C" fn(
    filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
    filter_module_ptr: envoy_dynamic_module_type_http_filter_module_ptr,
    callout_id: u64,
    result: envoy_dynamic_module_type_http_callout_result,
    headers: *mut envoy_dynamic_module_type_envoy_http_header,
    headers_size: usize,
    body_chunks: *mut envoy_dynamic_module_type_envoy_buffer,
    body_chunks_size: usize,
);
pub type OnHttpFilterHttpStreamHeaders = unsafe extern "C" fn(
    filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
    filter_module_ptr: envoy_dynamic_module_type_http_filter_module_ptr,
    stream_id: u64,
    headers: *mut envoy_dynamic_module_type_envoy_http_header,
    headers_size: usize,
    end_stream: bool,
);
pub type OnHttpFilterHttpStreamData = unsafe extern "C" fn(
    filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
    filter_module_ptr: envoy_dynamic_module_type_http_filter_module_ptr,
    stream_id: u64,
    data: *const envoy_dynamic_module_type_envoy_buffer,
    data_count: usize,
    end_stream: bool,
);
pub type OnHttpFilterHttpStreamTrailers = unsafe extern "C" fn(
    filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
    filter_module_ptr: envoy_dynamic_module_type_http_filter_module_ptr,
    stream_id: u64,
    trailers: *mut envoy_dynamic_module_type_envoy_http_header,
    trailers_size: usize,
);
pub type OnHttpFilterHttpStreamComplete = unsafe extern "C" fn(
    filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
    filter_module_ptr: envoy_dynamic_module_type_http_filter_module_ptr,
    stream_id: u64,
);
pub type OnHttpFilterHttpStreamReset = unsafe extern "C" fn(
    filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
    filter_module_ptr: envoy_dynamic_module_type_http_filter_module_ptr,
    stream_id: u64,
    reason: envoy_dynamic_module_type_http_stream_reset_reason,
);
pub type OnHttpFilterScheduled = unsafe extern "C" fn(
    filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
    filter_module_ptr: envoy_dynamic_module_type_http_filter_module_ptr,
    event_id: u64,
);
pub type OnHttpFilterDownstreamWatermark = unsafe extern "C" fn(
    filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
    filter_module_ptr: envoy_dynamic_module_type_http_filter_module_ptr,
);
pub type OnHttpFilterLocalReply =
    unsafe extern "C" fn(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        filter_module_ptr: envoy_dynamic_module_type_http_filter_module_ptr,
        response_code: u32,
        details: envoy_dynamic_module_type_envoy_buffer,
        reset_imminent: bool,
    ) -> envoy_dynamic_module_type_on_http_filter_local_reply_status;
pub type OnHttpFilterConfigScheduled = unsafe extern "C" fn(
    filter_config_envoy_ptr: envoy_dynamic_module_type_http_filter_config_envoy_ptr,
    filter_config_ptr: envoy_dynamic_module_type_http_filter_config_module_ptr,
    event_id: u64,
);
pub type OnHttpFilterConfigHttpCalloutDone = unsafe extern "C" fn(
    filter_config_envoy_ptr: envoy_dynamic_module_type_http_filter_config_envoy_ptr,
    filter_config_ptr: envoy_dynamic_module_type_http_filter_config_module_ptr,
    callout_id: u64,
    result: envoy_dynamic_module_type_http_callout_result,
    headers: *mut envoy_dynamic_module_type_envoy_http_header,
    headers_size: usize,
    body_chunks: *mut envoy_dynamic_module_type_envoy_buffer,
    body_chunks_size: usize,
);
pub type OnHttpFilterConfigHttpStreamHeaders = unsafe extern "C" fn(
    filter_config_envoy_ptr: envoy_dynamic_module_type_http_filter_config_envoy_ptr,
    filter_config_ptr: envoy_dynamic_module_type_http_filter_config_module_ptr,
    stream_id: u64,
    headers: *mut envoy_dynamic_module_type_envoy_http_header,
    headers_size: usize,
    end_stream: bool,
);
pub type OnHttpFilterConfigHttpStreamData = unsafe extern "C" fn(
    filter_config_envoy_ptr: envoy_dynamic_module_type_http_filter_config_envoy_ptr,
    filter_config_ptr: envoy_dynamic_module_type_http_filter_config_module_ptr,
    stream_id: u64,
    data: *const envoy_dynamic_module_type_envoy_buffer,
    data_count: usize,
    end_stream: bool,
);
pub type OnHttpFilterConfigHttpStreamTrailers = unsafe extern "C" fn(
    filter_config_envoy_ptr: envoy_dynamic_module_type_http_filter_config_envoy_ptr,
    filter_config_ptr: envoy_dynamic_module_type_http_filter_config_module_ptr,
    stream_id: u64,
    trailers: *mut envoy_dynamic_module_type_envoy_http_header,
    trailers_size: usize,
);
pub type OnHttpFilterConfigHttpStreamComplete = unsafe extern "C" fn(
    filter_config_envoy_ptr: envoy_dynamic_module_type_http_filter_config_envoy_ptr,
    filter_config_ptr: envoy_dynamic_module_type_http_filter_config_module_ptr,
    stream_id: u64,
);
pub type OnHttpFilterConfigHttpStreamReset = unsafe extern "C" fn(
    filter_config_envoy_ptr: envoy_dynamic_module_type_http_filter_config_envoy_ptr,
    filter_config_ptr: envoy_dynamic_module_type_http_filter_config_module_ptr,
    stream_id: u64,
    reason: envoy_dynamic_module_type_http_stream_reset_reason,
);

// --- small helpers (no allocation) ---------------------------------------------------------

impl envoy_dynamic_module_type_module_buffer {
    pub const NULL: Self = Self {
        ptr: core::ptr::null(),
        length: 0,
    };
    pub fn from_bytes(b: &[u8]) -> Self {
        Self {
            ptr: b.as_ptr() as *const c_char,
            length: b.len(),
        }
    }
}

impl envoy_dynamic_module_type_envoy_buffer {
    pub const NULL: Self = Self {
        ptr: core::ptr::null(),
        length: 0,
    };
    /// # Safety
    /// The buffer must come from Envoy and still be valid (see NOTES.md (h)).
    pub unsafe fn as_bytes<'a>(&self) -> &'a [u8] {
        if self.ptr.is_null() || self.length == 0 {
            &[]
        } else {
            core::slice::from_raw_parts(self.ptr as *const u8, self.length)
        }
    }
}

impl envoy_dynamic_module_type_module_http_header {
    pub fn new(key: &[u8], value: &[u8]) -> Self {
        Self {
            key_ptr: key.as_ptr() as *const c_char,
            key_length: key.len(),
            value_ptr: value.as_ptr() as *const c_char,
            value_length: value.len(),
        }
    }
}
