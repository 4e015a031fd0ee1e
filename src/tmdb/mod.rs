//! TMDB facts: its auth scheme, its rules, its status codes, and the query view they read.
//!
//! Pure data and rewrite rules, no sockets. Anything TMDB-specific that other modules need
//! (parameter names, the auth scheme, status bodies, documented refusals) is defined here once.

pub mod auth;
pub mod query;
pub mod rules;
pub mod status;

pub use query::Query;
pub use status::{ErrorBody, Status};
