//! tmdb-proxy: a rate-limiting reverse proxy for the TMDB API.
//!
//! Many app instances share one TMDB API key; TMDB allows about 50 requests per second per key
//! and answers more with 429 (status code 25). The proxy keeps one budget per key, answers over-limit
//! requests itself before TMDB would, and speaks TMDB's error format for every failure.
//!
//! # Layout
//! - [`config`]: TOML + environment → validated, typed sections. The only module reading files/env.
//! - [`error`]: `ProxyError` and the one function mapping an error to a TMDB status response.
//! - [`proxy`]: `Proxy::handle → process → finish`: the phases in order, the admission step
//!   (token, ready connection, confirm), the per-request context, the one exit, the response
//!   body held for slow clients, and the guard of the injected key.
//! - [`clients`]: apps sharing a key: their tokens, the key each is sent with, and the fair
//!   shares and priorities between the apps of a saturated key.
//! - [`limiter`]: the budget interface, the local budget, its `DashMap` store, the pure bucket
//!   math of one key, and the keys lately known to the upstream.
//! - [`upstream`]: the capped pool of upstream connections and its waiting room (in turn by key),
//!   its rustls configuration, timeouts.
//! - [`tmdb`]: TMDB facts: the auth scheme, the query view, documented refusals, the status table.
//! - [`server`]: the accept loop, serving a connection (plain or TLS), idle timeout, graceful
//!   shutdown, signals, reload, the open-files limit.
//! - [`admin`]: the admin listener: `/healthz`, `/readyz`, `/metrics`.
//! - [`metrics`]: Prometheus metric names and record functions.
//! - [`sim`]: an in-process TMDB stand-in for tests and offline demos (`tmdb-sim`).
//! - [`telemetry`]: logging setup.

pub mod admin;
pub mod cache;
pub mod clients;
pub mod config;
pub mod error;
#[cfg(test)]
mod fuzz;
pub mod limiter;
pub mod metrics;
pub mod proxy;
pub mod server;
pub mod sim;
pub mod status;
pub mod telemetry;
pub mod tmdb;
pub mod upstream;

pub use config::Config;
pub use proxy::Proxy;
