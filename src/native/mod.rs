//! The Envoy dynamic-module adapter: the same gateway as a native shared
//! library (`libmeshllm.so`) loaded by Envoy's `dynamic_modules` filter.
