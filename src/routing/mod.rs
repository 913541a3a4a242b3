//! Per-request routing: which targets of a route are tried, in which order
//! (`route`), from their health and latency shared by every worker
//! (`health`). Routes themselves are configured in `config::routing`.

pub mod health;
pub mod route;
