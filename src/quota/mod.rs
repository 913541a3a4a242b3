//! Quotas and budgets: which buckets a request draws from (`limits`),
//! whether it is admitted and what it finally cost (`admission`), the
//! counters every worker shares (`buckets`), and prices (`pricing`).

pub mod admission;
pub mod buckets;
pub mod lease;
pub mod limits;
pub mod pricing;
pub mod store;
