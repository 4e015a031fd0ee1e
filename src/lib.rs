//! tmdb-proxy: a rate-limiting reverse proxy for the TMDB API.
//!
//! Many app instances share one TMDB API key; TMDB allows about 50 requests per second per key
//! and answers more with 429 (status code 25). The proxy keeps one budget per key, answers over-limit
//! requests itself before TMDB would, and speaks TMDB's error format for every failure.
//!
//! # Layout
//! - [`config`]: TOML + environment → validated, typed sections. The only module reading files/env.
//! - [`error`]: `ProxyError` and the one function mapping an error to a TMDB status response.
//! - [`limiter`]: per-key buckets (pure math in `bucket`, the `DashMap` in `store`, key identity in
//!   `key`); the facade is the only place a rate decision reads the clock.
//! - [`proxy`]: `Proxy::handle`, the phases (`request_filter → upstream_request → response_filter`),
//!   header names, and the response body type.
//! - [`upstream`]: the pooled rustls client with its connection cap and timeouts.
//! - [`tmdb`]: TMDB facts: parameter names and the status code table.
//! - [`metrics`]: Prometheus metric names and record functions.
//! - [`admin`]: the admin listener: `/healthz`, `/readyz`, `/metrics`.
//! - [`server`]: accept loop, connection cap, graceful shutdown, signals.
//! - [`sim`]: an in-process TMDB stand-in for tests and offline demos (`tmdb-sim`).
//! - [`telemetry`]: logging setup.

pub mod admin;
pub mod config;
pub mod error;
pub mod limiter;
pub mod metrics;
pub mod proxy;
pub mod server;
pub mod sim;
pub mod telemetry;
pub mod tmdb;
pub mod upstream;

pub use config::Config;
pub use proxy::Proxy;
