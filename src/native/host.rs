//! `Host` over Envoy's dynamic-module ABI, for one callback: a stream's
//! (with its Envoy filter pointer) or the config's own on the main thread
//! (detached answers and ticks, where only shared data, metrics and further
//! detached calls mean anything).

use std::cell::Cell;
use std::sync::Arc;

use crate::host::{Callout, CalloutId, DetachedHandler, Host, HostError, HostResult, SharedData};
use crate::metrics::{Kind, Labels};

use super::abi::{
    self, envoy_dynamic_module_type_envoy_buffer as EnvoyBuffer,
    envoy_dynamic_module_type_envoy_http_header as EnvoyHeader,
    envoy_dynamic_module_type_module_buffer as ModuleBuffer,
    envoy_dynamic_module_type_module_http_header as ModuleHeader,
};
use super::callout::{lossy, OwnedCallout};
use super::config::NativeConfig;
use super::{shared, timer, EnvoyPtr};

/// Dynamic metadata namespace of the values the filter leaves for itself
/// and for access logs (`%DYNAMIC_METADATA(meshllm:path)%`).
pub const METADATA_NAMESPACE: &str = "meshllm";
/// Properties the filter sets are named `meshllm.<key>`.
const PROPERTY_PREFIX: &str = "meshllm.";
/// Marks a metadata string that holds hex-encoded bytes (values that are
/// not UTF-8, such as the binary plan the halves pass each other).
const HEX_MARK: &str = "\u{1}hex:";

pub struct NativeHost<'a> {
    /// The stream's Envoy filter; null in the config's own callbacks.
    filter: EnvoyPtr,
    config: &'a Arc<NativeConfig>,
    /// The clock, read once per callback.
    now_us: Cell<Option<u64>>,
    /// The config whose metrics this callback updates, found once.
    metrics_home: std::cell::OnceCell<Arc<NativeConfig>>,
    /// A request header changed: Envoy must pick the route again (as
    /// proxy-wasm has it do after every change), once, after the callback.
    route_changed: bool,
}

impl<'a> NativeHost<'a> {
    pub fn stream(filter: EnvoyPtr, config: &'a Arc<NativeConfig>) -> Self {
        NativeHost {
            filter,
            config,
            now_us: Cell::new(None),
            metrics_home: std::cell::OnceCell::new(),
            route_changed: false,
        }
    }

    pub fn root(config: &'a Arc<NativeConfig>) -> Self {
        Self::stream(EnvoyPtr(std::ptr::null_mut()), config)
    }

    /// Lets changed request headers re-select the route (listener half),
    /// once per callback, before the request goes on: clearing the route
    /// after the router took the request over would pull the route from
    /// under it.
    pub fn finish_callback(&mut self) {
        if !self.route_changed || self.config.upstream {
            return;
        }
        self.route_changed = false;
        if let Ok(filter) = self.filter() {
            // SAFETY: the live stream of the current hook.
            unsafe { abi::envoy_dynamic_module_callback_http_clear_route_cache(filter.0) }
        }
    }

    fn filter(&self) -> HostResult<EnvoyPtr> {
        if self.filter.0.is_null() {
            Err(HostError("no stream in this callback".into()))
        } else {
            Ok(self.filter)
        }
    }

    fn header(&self, kind: u32, name: &str) -> Option<String> {
        let filter = self.filter().ok()?;
        let mut value = EnvoyBuffer::NULL;
        // SAFETY: live stream; the value is copied before the callback ends.
        let found = unsafe {
            abi::envoy_dynamic_module_callback_http_get_header(
                filter.0,
                kind,
                ModuleBuffer::from_bytes(name.as_bytes()),
                &mut value,
                0,
                std::ptr::null_mut(),
            )
        };
        // SAFETY: Envoy's buffer, valid during this callback.
        found.then(|| unsafe { lossy(value.ptr, value.length) })
    }

    fn header_names(&self, kind: u32) -> HostResult<Vec<String>> {
        let filter = self.filter()?;
        // SAFETY: live stream; the array has room for every header.
        unsafe {
            let size = abi::envoy_dynamic_module_callback_http_get_headers_size(filter.0, kind);
            let mut headers = vec![
                EnvoyHeader {
                    key_ptr: std::ptr::null(),
                    key_length: 0,
                    value_ptr: std::ptr::null(),
                    value_length: 0,
                };
                size
            ];
            if size > 0
                && !abi::envoy_dynamic_module_callback_http_get_headers(
                    filter.0,
                    kind,
                    headers.as_mut_ptr(),
                )
            {
                return Err(HostError("could not read the headers".into()));
            }
            Ok(headers
                .iter()
                .map(|h| lossy(h.key_ptr, h.key_length))
                .collect())
        }
    }

    fn set_header(&mut self, kind: u32, name: &str, value: Option<&str>) -> HostResult {
        let filter = self.filter()?;
        self.route_changed |= kind == abi::HEADER_TYPE_REQUEST_HEADER;
        let value = value.map_or(ModuleBuffer::NULL, |v| {
            ModuleBuffer::from_bytes(v.as_bytes())
        });
        // SAFETY: live stream; Envoy copies the buffers. A null value removes.
        let done = unsafe {
            abi::envoy_dynamic_module_callback_http_set_header(
                filter.0,
                kind,
                ModuleBuffer::from_bytes(name.as_bytes()),
                value,
            )
        };
        if done || value.ptr.is_null() {
            Ok(())
        } else {
            Err(HostError(format!("could not set header {name}")))
        }
    }

    /// The body so far: what this filter buffered, then the chunk of this
    /// callback (unless that chunk is the buffer itself).
    fn body(&self, buffered: u32, received: u32, size: usize) -> HostResult<Vec<u8>> {
        let filter = self.filter()?;
        let mut out = Vec::with_capacity(size);
        let kinds: &[u32] = if self.received_is_buffered(received) {
            &[buffered]
        } else {
            &[buffered, received]
        };
        for &kind in kinds {
            // SAFETY: live stream; the chunks are copied during the callback.
            unsafe {
                let n =
                    abi::envoy_dynamic_module_callback_http_get_body_chunks_size(filter.0, kind);
                if n == 0 {
                    continue;
                }
                let mut chunks = vec![EnvoyBuffer::NULL; n];
                if !abi::envoy_dynamic_module_callback_http_get_body_chunks(
                    filter.0,
                    kind,
                    chunks.as_mut_ptr(),
                ) {
                    continue;
                }
                for chunk in &chunks {
                    out.extend_from_slice(chunk.as_bytes());
                }
            }
        }
        out.truncate(size);
        Ok(out)
    }

    fn received_is_buffered(&self, received: u32) -> bool {
        // SAFETY: live stream.
        unsafe {
            if received == abi::BODY_RECEIVED_REQUEST {
                abi::envoy_dynamic_module_callback_http_received_buffered_request_body(
                    self.filter.0,
                )
            } else {
                abi::envoy_dynamic_module_callback_http_received_buffered_response_body(
                    self.filter.0,
                )
            }
        }
    }

    /// Replaces the first `old_size` bytes of the body with `body`.
    fn replace_body(
        &mut self,
        buffered: u32,
        received: u32,
        old_size: usize,
        body: &[u8],
    ) -> HostResult {
        let filter = self.filter()?;
        // SAFETY: live stream; Envoy copies the appended bytes.
        unsafe {
            let size = |kind| abi::envoy_dynamic_module_callback_http_get_body_size(filter.0, kind);
            let in_buffer = size(buffered);
            let same = self.received_is_buffered(received);
            let in_chunk = if same { 0 } else { size(received) };
            let total = in_buffer + in_chunk;
            // Bytes past `old_size` stay after the new ones.
            let tail = if old_size < total {
                self.body(buffered, received, total)?.split_off(old_size)
            } else {
                Vec::new()
            };
            let target = if in_buffer > 0 || same {
                buffered
            } else {
                received
            };
            let ok = (in_buffer == 0
                || abi::envoy_dynamic_module_callback_http_drain_body(
                    filter.0, buffered, in_buffer,
                ))
                && (in_chunk == 0
                    || abi::envoy_dynamic_module_callback_http_drain_body(
                        filter.0, received, in_chunk,
                    ))
                && abi::envoy_dynamic_module_callback_http_append_body(
                    filter.0,
                    target,
                    ModuleBuffer::from_bytes(body),
                )
                && (tail.is_empty()
                    || abi::envoy_dynamic_module_callback_http_append_body(
                        filter.0,
                        target,
                        ModuleBuffer::from_bytes(&tail),
                    ));
            if ok {
                Ok(())
            } else {
                Err(HostError("could not replace the body".into()))
            }
        }
    }

    /// A string attribute of the stream; an empty one counts as absent
    /// (Envoy gives "" for what proxy-wasm reports as missing).
    fn attribute(&self, id: u32) -> Option<Vec<u8>> {
        let filter = self.filter().ok()?;
        let mut value = EnvoyBuffer::NULL;
        // SAFETY: live stream; copied during the callback.
        unsafe {
            abi::envoy_dynamic_module_callback_http_filter_get_attribute_string(
                filter.0, id, &mut value,
            )
            .then(|| value.as_bytes().to_vec())
        }
        .filter(|v| !v.is_empty())
    }

    fn metadata_string(&self, source: u32, namespace: &str, key: &str) -> Option<Vec<u8>> {
        let filter = self.filter().ok()?;
        let mut value = EnvoyBuffer::NULL;
        // SAFETY: live stream; copied during the callback.
        let text = unsafe {
            abi::envoy_dynamic_module_callback_http_get_metadata_string(
                filter.0,
                source,
                ModuleBuffer::from_bytes(namespace.as_bytes()),
                ModuleBuffer::from_bytes(key.as_bytes()),
                &mut value,
            )
            .then(|| value.as_bytes().to_vec())
        }?;
        match text.strip_prefix(HEX_MARK.as_bytes()) {
            Some(hex) => unhex(hex),
            None => Some(text),
        }
    }

    fn metrics_home(&self) -> &Arc<NativeConfig> {
        self.metrics_home
            .get_or_init(|| self.config.metrics_config())
    }

    fn update(&self, kind: Kind, name: &str, value: u64) {
        let (base, pairs) = crate::metrics::split(name);
        let home = self.metrics_home();
        home.metrics.update(home.envoy, kind, base, pairs, value);
    }

    fn update_labelled(
        &self,
        kind: Kind,
        metric: &str,
        labels: &Labels,
        extra: &[(&str, &str)],
        value: u64,
    ) {
        let pairs = labels.pairs().chain(extra.iter().copied());
        let home = self.metrics_home();
        home.metrics.update(home.envoy, kind, metric, pairs, value);
    }
}

impl SharedData for NativeHost<'_> {
    fn shared_get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        shared::get(key)
    }
    fn shared_set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> HostResult<bool> {
        shared::set(key, value, cas)
    }
}

impl Host for NativeHost<'_> {
    fn request_header(&self, name: &str) -> Option<String> {
        self.header(abi::HEADER_TYPE_REQUEST_HEADER, name)
    }
    fn request_header_names(&self) -> HostResult<Vec<String>> {
        self.header_names(abi::HEADER_TYPE_REQUEST_HEADER)
    }
    fn set_request_header(&mut self, name: &str, value: &str) -> HostResult {
        self.set_header(abi::HEADER_TYPE_REQUEST_HEADER, name, Some(value))
    }
    fn remove_request_header(&mut self, name: &str) -> HostResult {
        self.set_header(abi::HEADER_TYPE_REQUEST_HEADER, name, None)
    }
    fn request_body(&self, size: usize) -> HostResult<Vec<u8>> {
        self.body(abi::BODY_BUFFERED_REQUEST, abi::BODY_RECEIVED_REQUEST, size)
    }
    fn replace_request_body(&mut self, old_size: usize, body: &[u8]) -> HostResult {
        self.replace_body(
            abi::BODY_BUFFERED_REQUEST,
            abi::BODY_RECEIVED_REQUEST,
            old_size,
            body,
        )
    }
    fn response_header(&self, name: &str) -> Option<String> {
        self.header(abi::HEADER_TYPE_RESPONSE_HEADER, name)
    }
    fn response_header_names(&self) -> HostResult<Vec<String>> {
        self.header_names(abi::HEADER_TYPE_RESPONSE_HEADER)
    }
    fn set_response_header(&mut self, name: &str, value: &str) -> HostResult {
        self.set_header(abi::HEADER_TYPE_RESPONSE_HEADER, name, Some(value))
    }
    fn remove_response_header(&mut self, name: &str) -> HostResult {
        self.set_header(abi::HEADER_TYPE_RESPONSE_HEADER, name, None)
    }
    fn response_body(&self, size: usize) -> HostResult<Vec<u8>> {
        self.body(
            abi::BODY_BUFFERED_RESPONSE,
            abi::BODY_RECEIVED_RESPONSE,
            size,
        )
    }
    fn replace_response_body(&mut self, old_size: usize, body: &[u8]) -> HostResult {
        self.replace_body(
            abi::BODY_BUFFERED_RESPONSE,
            abi::BODY_RECEIVED_RESPONSE,
            old_size,
            body,
        )
    }
    fn response_code_details(&self) -> Option<String> {
        self.attribute(abi::ATTR_RESPONSE_CODE_DETAILS)
            .and_then(|b| String::from_utf8(b).ok())
    }
    fn send_response(&mut self, status: u16, headers: &[(&str, &str)], body: &[u8]) -> HostResult {
        let filter = self.filter()?;
        let mut headers: Vec<ModuleHeader> = headers
            .iter()
            .map(|(n, v)| ModuleHeader::new(n.as_bytes(), v.as_bytes()))
            .collect();
        // SAFETY: live stream; Envoy copies headers and body.
        unsafe {
            abi::envoy_dynamic_module_callback_http_send_response(
                filter.0,
                u32::from(status),
                headers.as_mut_ptr(),
                headers.len(),
                ModuleBuffer::from_bytes(body),
                ModuleBuffer::from_bytes(b"meshllm"),
            )
        }
        Ok(())
    }
    fn now_unix_micros(&self) -> u64 {
        if let Some(now) = self.now_us.get() {
            return now;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        self.now_us.set(Some(now));
        now
    }
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        match path {
            [name] => {
                let key = name.strip_prefix(PROPERTY_PREFIX)?;
                self.metadata_string(abi::METADATA_SOURCE_DYNAMIC, METADATA_NAMESPACE, key)
            }
            ["response", "code_details"] => self.attribute(abi::ATTR_RESPONSE_CODE_DETAILS),
            ["upstream", "local_address"] => self.attribute(abi::ATTR_UPSTREAM_LOCAL_ADDRESS),
            ["upstream", "transport_failure_reason"] => {
                self.attribute(abi::ATTR_UPSTREAM_TRANSPORT_FAILURE_REASON)
            }
            ["connection", "uri_san_peer_certificate"] => {
                self.attribute(abi::ATTR_CONNECTION_URI_SAN_PEER_CERTIFICATE)
            }
            ["xds", "upstream_host_metadata", "filter_metadata", namespace, key] => {
                self.metadata_string(abi::METADATA_SOURCE_HOST, namespace, key)
            }
            ["xds", "node", "metadata", rest @ ..] => super::node::metadata(rest),
            // The module ABI has no listener metadata: a namespace policy
            // rides on the routes instead (see render.py put_route_metadata).
            ["xds", "listener_metadata", "filter_metadata", namespace, key] => {
                self.metadata_string(abi::METADATA_SOURCE_ROUTE, namespace, key)
            }
            _ => {
                log::debug!("property {path:?} is not available in the native build");
                None
            }
        }
    }
    fn set_property(&mut self, path: &[&str], value: &[u8]) -> HostResult {
        let filter = self.filter()?;
        let key = match path {
            [name] => name.strip_prefix(PROPERTY_PREFIX),
            _ => None,
        }
        .ok_or_else(|| HostError(format!("property {path:?} cannot be set")))?;
        let text = match std::str::from_utf8(value) {
            Ok(text) if !text.starts_with(HEX_MARK) => std::borrow::Cow::Borrowed(text),
            _ => std::borrow::Cow::Owned(format!("{HEX_MARK}{}", hex(value))),
        };
        // SAFETY: live stream; Envoy copies the strings.
        unsafe {
            abi::envoy_dynamic_module_callback_http_set_dynamic_metadata_string(
                filter.0,
                ModuleBuffer::from_bytes(METADATA_NAMESPACE.as_bytes()),
                ModuleBuffer::from_bytes(key.as_bytes()),
                ModuleBuffer::from_bytes(text.as_bytes()),
            )
        }
        Ok(())
    }
    fn count(&mut self, name: &str, delta: u64) {
        self.update(Kind::Counter, name, delta);
    }
    fn gauge(&mut self, name: &str, value: u64) {
        self.update(Kind::Gauge, name, value);
    }
    fn histogram(&mut self, name: &str, value: u64) {
        self.update(Kind::Histogram, name, value);
    }
    fn count_labelled(
        &mut self,
        metric: &str,
        labels: &Labels,
        extra: &[(&str, &str)],
        delta: u64,
    ) {
        self.update_labelled(Kind::Counter, metric, labels, extra, delta);
    }
    fn gauge_labelled(
        &mut self,
        metric: &str,
        labels: &Labels,
        extra: &[(&str, &str)],
        value: u64,
    ) {
        self.update_labelled(Kind::Gauge, metric, labels, extra, value);
    }
    fn histogram_labelled(
        &mut self,
        metric: &str,
        labels: &Labels,
        extra: &[(&str, &str)],
        value: u64,
    ) {
        self.update_labelled(Kind::Histogram, metric, labels, extra, value);
    }
    fn call_out(&mut self, call: &Callout) -> HostResult<CalloutId> {
        let filter = self.filter()?;
        let id = OwnedCallout::of(call)?.dispatch_from_stream(filter)?;
        // Envoy numbers a stream's calls from 1; ours are 32-bit.
        CalloutId::try_from(id).map_err(|_| HostError(format!("callout id {id} is out of range")))
    }
    fn call_out_detached(
        &mut self,
        call: &Callout,
        then: DetachedHandler,
    ) -> HostResult<CalloutId> {
        self.config.queue_detached(OwnedCallout::of(call)?, then);
        Ok(0)
    }
    fn wake_root_in(&mut self, ms: u64) -> HostResult {
        timer::wake(Arc::downgrade(self.config), ms).map_err(HostError)
    }
    fn resume_request(&mut self) -> HostResult {
        let filter = self.filter()?;
        self.finish_callback();
        // SAFETY: live stream, on its worker.
        unsafe { abi::envoy_dynamic_module_callback_http_filter_continue_decoding(filter.0) }
        Ok(())
    }
    fn resume_response(&mut self) -> HostResult {
        let filter = self.filter()?;
        // SAFETY: live stream, on its worker.
        unsafe { abi::envoy_dynamic_module_callback_http_filter_continue_encoding(filter.0) }
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    out
}

fn unhex(text: &[u8]) -> Option<Vec<u8>> {
    let digit = |c: u8| {
        char::from(c)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    };
    text.chunks(2)
        .map(|pair| match pair {
            [hi, lo] => Some(digit(*hi)? << 4 | digit(*lo)?),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_any_bytes() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(unhex(hex(&bytes).as_bytes()).unwrap(), bytes);
        assert_eq!(unhex(b"abc"), None);
        assert_eq!(unhex(b"zz"), None);
    }
}
