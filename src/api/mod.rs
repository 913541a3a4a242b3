//! Wire shapes of the APIs the gateway speaks to callers.

pub mod openai;
