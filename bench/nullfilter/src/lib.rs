//! The benchmark's floor: what any proxy-wasm filter that must see the whole
//! request body costs in this Envoy, measured beside meshllm in the same run.
//! It pauses on the request headers as meshllm does, reads the buffered body
//! once, and lets the request go on unchanged.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType};

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
}}

struct Root;

impl Context for Root {}

impl RootContext for Root {
    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Buffering))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Buffering;

impl Context for Buffering {}

impl HttpContext for Buffering {
    fn on_http_request_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        if end_of_stream {
            Action::Continue
        } else {
            Action::Pause
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !end_of_stream {
            return Action::Pause;
        }
        // Read it as a filter that inspects the body would; the bytes are unused.
        let _ = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size);
        Action::Continue
    }
}
