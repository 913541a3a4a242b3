//! HTTP callouts through Envoy's async client: request-owned ones from a
//! stream (answered on its worker; Envoy cancels them when the stream
//! ends) and config-owned ones for detached calls (sent and answered on the
//! main thread).

use crate::host::{Callout, CalloutAnswer, CalloutKind, HostError, HostResult};

use super::abi::{
    self, envoy_dynamic_module_type_envoy_buffer as EnvoyBuffer,
    envoy_dynamic_module_type_envoy_http_header as EnvoyHeader,
    envoy_dynamic_module_type_module_buffer as ModuleBuffer,
    envoy_dynamic_module_type_module_http_header as ModuleHeader,
};
use super::EnvoyPtr;

/// A call with its own copies of everything, so it can wait for the main
/// thread.
pub struct OwnedCallout {
    cluster: String,
    /// `:method`, `:path`, `host`, then the call's own headers.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    timeout_ms: u64,
}

impl OwnedCallout {
    pub fn of(call: &Callout) -> HostResult<Self> {
        let CalloutKind::Http {
            method,
            path,
            authority,
            headers,
            body,
        } = call.kind
        else {
            // No stage makes gRPC calls yet; Envoy's module ABI offers HTTP
            // callouts only, so a gRPC one would be framed by hand here.
            return Err(HostError(
                "gRPC callouts are not available in the native build".into(),
            ));
        };
        let mut all = vec![
            (":method".to_string(), method.to_string()),
            (":path".to_string(), path.to_string()),
            ("host".to_string(), authority.to_string()),
        ];
        all.extend(headers.iter().map(|(n, v)| (n.to_string(), v.to_string())));
        Ok(OwnedCallout {
            cluster: call.cluster.to_string(),
            headers: all,
            body: body.to_vec(),
            // Envoy treats 0 as no timeout; a call always has one here.
            timeout_ms: call.timeout_ms.max(1),
        })
    }

    /// Sends the call on behalf of stream `filter`; Envoy's id for it.
    pub fn dispatch_from_stream(&self, filter: EnvoyPtr) -> HostResult<u64> {
        self.dispatch(|id, cluster, headers, len, body, timeout| {
            // SAFETY: `filter` is the live stream of the current callback;
            // every buffer lives for the call and Envoy copies them.
            unsafe {
                abi::envoy_dynamic_module_callback_http_filter_http_callout(
                    filter.0, id, cluster, headers, len, body, timeout,
                )
            }
        })
    }

    /// Sends the call on behalf of filter config `config` (main thread).
    pub fn dispatch_from_config(&self, config: EnvoyPtr) -> HostResult<u64> {
        self.dispatch(|id, cluster, headers, len, body, timeout| {
            // SAFETY: as above, with Envoy's live config object.
            unsafe {
                abi::envoy_dynamic_module_callback_http_filter_config_http_callout(
                    config.0, id, cluster, headers, len, body, timeout,
                )
            }
        })
    }

    fn dispatch(
        &self,
        send: impl FnOnce(&mut u64, ModuleBuffer, *mut ModuleHeader, usize, ModuleBuffer, u64) -> u32,
    ) -> HostResult<u64> {
        let mut headers: Vec<ModuleHeader> = self
            .headers
            .iter()
            .map(|(n, v)| ModuleHeader::new(n.as_bytes(), v.as_bytes()))
            .collect();
        let mut id = 0u64;
        let len = headers.len();
        let result = send(
            &mut id,
            ModuleBuffer::from_bytes(self.cluster.as_bytes()),
            headers.as_mut_ptr(),
            len,
            ModuleBuffer::from_bytes(&self.body),
            self.timeout_ms,
        );
        match result {
            abi::CALLOUT_INIT_SUCCESS => Ok(id),
            abi::CALLOUT_INIT_CLUSTER_NOT_FOUND => Err(HostError(format!(
                "no cluster {} for the call",
                self.cluster
            ))),
            abi::CALLOUT_INIT_CANNOT_CREATE_REQUEST => Err(HostError(format!(
                "the call could not start (no healthy host in {}?)",
                self.cluster
            ))),
            other => Err(HostError(format!("the call was refused: result {other}"))),
        }
    }
}

/// The answer Envoy delivered to a callout's done hook.
///
/// # Safety
/// The pointers and lengths are those of the done hook, valid during it.
pub unsafe fn answer(
    result: u32,
    headers: *const EnvoyHeader,
    headers_size: usize,
    chunks: *const EnvoyBuffer,
    chunks_size: usize,
) -> CalloutAnswer {
    match result {
        abi::CALLOUT_SUCCESS => {}
        abi::CALLOUT_EXCEED_RESPONSE_BUFFER_LIMIT => {
            return CalloutAnswer::Failed("the answer exceeded the buffer limit".into())
        }
        _ => {
            return CalloutAnswer::Failed(
                "no answer (timeout, reset, connection failure or no healthy host)".into(),
            )
        }
    }
    let headers: Vec<(String, String)> = slice(headers, headers_size)
        .iter()
        .map(|h| {
            (
                lossy(h.key_ptr, h.key_length),
                lossy(h.value_ptr, h.value_length),
            )
        })
        .collect();
    let Some(status) = headers
        .iter()
        .find(|(n, _)| n == ":status")
        .and_then(|(_, v)| v.parse().ok())
    else {
        return CalloutAnswer::Failed("an answer without a status".into());
    };
    let mut body = Vec::new();
    for chunk in slice(chunks, chunks_size) {
        body.extend_from_slice(chunk.as_bytes());
    }
    CalloutAnswer::Http {
        status,
        headers,
        body,
    }
}

/// # Safety
/// `ptr` must point at `len` values (or be null with any `len`).
pub unsafe fn slice<'a, T>(ptr: *const T, len: usize) -> &'a [T] {
    if ptr.is_null() || len == 0 {
        &[]
    } else {
        std::slice::from_raw_parts(ptr, len)
    }
}

/// # Safety
/// `ptr` must point at `len` bytes (or be null).
pub unsafe fn lossy(ptr: *const std::ffi::c_char, len: usize) -> String {
    let bytes = slice(ptr.cast::<u8>(), len);
    String::from_utf8_lossy(bytes).into_owned()
}
