//! Rate budgets: how many requests of a key may reach the upstream, and when.
//!
//! - [`bucket`]: the window math of one key, a pure function of `now`.
//! - [`store`]: the `DashMap` of buckets; every access is one closure under one shard lock.
//! - [`budget`]: the interface the admission step talks to ([`Budget`]), and its vocabulary:
//!   [`Grant`], [`Refusal`], [`RateState`], [`Policy`].
//! - [`local`]: [`LocalBudget`], the budget of one process.
//! - [`key`]: [`Key`], the hashed identity of a budget.
//! - [`known`]: [`KnownKeys`], keys the upstream lately answered with success.
//!
//! The limiter knows nothing of HTTP, credentials or tracing spans: it sees a [`Key`] and a `now`,
//! and answers a grant or a refusal that the proxy turns into headers and bodies.

pub mod bucket;
pub mod budget;
pub mod key;
pub mod known;
pub mod local;
pub mod shared;
pub mod store;

pub use bucket::{CLOCK_SKEW, Decision, Nanos, Quick, Quota};
pub use budget::{Budget, Grant, Pending, Policy, RateState, Reason, Refusal, Stamp};
pub use key::{Fingerprint, Key};
pub use known::KnownKeys;
pub use local::LocalBudget;
pub use shared::{Mode, SharedBudget};
pub use store::Store;
