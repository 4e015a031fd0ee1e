//! TMDB facts: how a request names its API key, and TMDB's status codes.
//!
//! Pure data and rewrite rules, no sockets. Anything TMDB-specific that other modules need
//! (parameter names, the auth scheme, status bodies) is defined here once.

pub mod rules;
pub mod status;

pub use status::{ErrorBody, Status};

/// Query parameter carrying a v3 API key.
pub const API_KEY_PARAM: &str = "api_key";

/// Scheme of a v4 read access token in `Authorization`.
pub const BEARER_PREFIX: &str = "Bearer ";
