//! Wire shapes of the APIs the gateway speaks to callers.

pub mod chat;
pub mod openai;
