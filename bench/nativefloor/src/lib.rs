//! The benchmark's native floor: what any Envoy dynamic module that must see
//! the whole request body costs in this Envoy (1.40, ABI v0.2.0), measured
//! beside meshllm's native build in the same run. The native analogue of
//! `bench/nullfilter`: it pauses on the request headers, reads the buffered
//! body once into its own memory, and lets the request go on unchanged.
//!
//! No SDK: the few callbacks it uses are declared by hand below, and it
//! exports every event hook Envoy 1.40 requires of an HTTP filter module
//! (the ones it has no use for do nothing).

use std::ffi::{c_char, c_void};

type EnvoyPtr = *mut c_void;
type ModulePtr = *const c_void;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyBuffer {
    ptr: *const c_char,
    length: usize,
}

#[repr(C)]
pub struct EnvoyHttpHeader {
    key_ptr: *const c_char,
    key_length: usize,
    value_ptr: *const c_char,
    value_length: usize,
}

// envoy_dynamic_module_type_http_body_type
const BODY_RECEIVED_REQUEST: u32 = 0;
const BODY_BUFFERED_REQUEST: u32 = 1;
// Statuses the event hooks return (Envoy's Filter*Status, 1:1).
const HEADERS_CONTINUE: u32 = 0;
const HEADERS_STOP_ITERATION: u32 = 1;
const BODY_CONTINUE: u32 = 0;
const BODY_STOP_ITERATION_AND_BUFFER: u32 = 1;
const TRAILERS_CONTINUE: u32 = 0;

extern "C" {
    fn envoy_dynamic_module_callback_http_get_body_chunks_size(
        filter_envoy_ptr: EnvoyPtr,
        body_type: u32,
    ) -> usize;
    fn envoy_dynamic_module_callback_http_get_body_chunks(
        filter_envoy_ptr: EnvoyPtr,
        body_type: u32,
        result_buffer_vector: *mut EnvoyBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_received_buffered_request_body(
        filter_envoy_ptr: EnvoyPtr,
    ) -> bool;
}

/// What config_new and filter_new hand back: the module keeps no state, but
/// Envoy reads a null pointer as a refusal.
static NOTHING: u8 = 0;

fn nothing() -> ModulePtr {
    std::ptr::addr_of!(NOTHING).cast()
}

/// Appends the body held as `body_type` to `out`.
///
/// # Safety
/// `filter` must be the filter Envoy passed to the running event hook.
unsafe fn read_body(filter: EnvoyPtr, body_type: u32, out: &mut Vec<u8>) {
    let n = envoy_dynamic_module_callback_http_get_body_chunks_size(filter, body_type);
    if n == 0 {
        return;
    }
    let mut chunks = vec![
        EnvoyBuffer {
            ptr: std::ptr::null(),
            length: 0
        };
        n
    ];
    if !envoy_dynamic_module_callback_http_get_body_chunks(filter, body_type, chunks.as_mut_ptr()) {
        return;
    }
    for c in chunks {
        if !c.ptr.is_null() && c.length > 0 {
            out.extend_from_slice(std::slice::from_raw_parts(c.ptr.cast::<u8>(), c.length));
        }
    }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    c"v0.2.0".as_ptr()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    _filter_config_envoy_ptr: EnvoyPtr,
    _name: EnvoyBuffer,
    _config: EnvoyBuffer,
) -> ModulePtr {
    nothing()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(_config: ModulePtr) {}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_new(
    _config: ModulePtr,
    _filter_envoy_ptr: EnvoyPtr,
) -> ModulePtr {
    nothing()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    _filter: EnvoyPtr,
    _module: ModulePtr,
    end_of_stream: bool,
) -> u32 {
    if end_of_stream {
        HEADERS_CONTINUE
    } else {
        HEADERS_STOP_ITERATION
    }
}

/// Buffers until the end of the body, then reads it whole: what Envoy
/// buffered (everything before the last chunk, which it has moved there
/// too), then the chunk in hand unless that chunk is the buffer itself.
///
/// # Safety
/// Called by Envoy with the filter of the running stream.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    filter: EnvoyPtr,
    _module: ModulePtr,
    end_of_stream: bool,
) -> u32 {
    if !end_of_stream {
        return BODY_STOP_ITERATION_AND_BUFFER;
    }
    let mut body = Vec::new();
    read_body(filter, BODY_BUFFERED_REQUEST, &mut body);
    if !envoy_dynamic_module_callback_http_received_buffered_request_body(filter) {
        read_body(filter, BODY_RECEIVED_REQUEST, &mut body);
    }
    // Read as a filter that inspects the body would; the bytes are unused.
    std::hint::black_box(&body);
    BODY_CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    _filter: EnvoyPtr,
    _module: ModulePtr,
) -> u32 {
    TRAILERS_CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    _filter: EnvoyPtr,
    _module: ModulePtr,
    _end_of_stream: bool,
) -> u32 {
    HEADERS_CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    _filter: EnvoyPtr,
    _module: ModulePtr,
    _end_of_stream: bool,
) -> u32 {
    BODY_CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    _filter: EnvoyPtr,
    _module: ModulePtr,
) -> u32 {
    TRAILERS_CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    _filter: EnvoyPtr,
    _module: ModulePtr,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_destroy(_module: ModulePtr) {}

// Required by Envoy 1.40 of every HTTP filter module; never called here (no
// callouts, streams or schedulers are started).

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    _filter: EnvoyPtr,
    _module: ModulePtr,
    _callout_id: u64,
    _result: u32,
    _headers: *mut EnvoyHttpHeader,
    _headers_size: usize,
    _body_chunks: *mut EnvoyBuffer,
    _body_chunks_size: usize,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _filter: EnvoyPtr,
    _module: ModulePtr,
    _stream_id: u64,
    _headers: *mut EnvoyHttpHeader,
    _headers_size: usize,
    _end_stream: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _filter: EnvoyPtr,
    _module: ModulePtr,
    _stream_id: u64,
    _data: *const EnvoyBuffer,
    _data_count: usize,
    _end_stream: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    _filter: EnvoyPtr,
    _module: ModulePtr,
    _stream_id: u64,
    _trailers: *mut EnvoyHttpHeader,
    _trailers_size: usize,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
    _filter: EnvoyPtr,
    _module: ModulePtr,
    _stream_id: u64,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
    _filter: EnvoyPtr,
    _module: ModulePtr,
    _stream_id: u64,
    _reason: u32,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    _filter: EnvoyPtr,
    _module: ModulePtr,
    _event_id: u64,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    _filter: EnvoyPtr,
    _module: ModulePtr,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    _filter: EnvoyPtr,
    _module: ModulePtr,
) {
}
