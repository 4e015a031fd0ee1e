//! The per-request context: what the phases learn about one request, read once by the exit.
//!
//! Each phase writes what it alone knows (the key once identified, the rate state once a token is
//! taken or refused, the upstream's timing and any pause it imposed); `Proxy::finish` reads it all
//! to write the headers, the metric and the log line, the same way for every outcome.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Method};
use tokio::time::Instant;

use super::guard::Cors;
use crate::clients::App;
use crate::limiter::{Key, RateState};
use crate::tmdb::auth;

/// Whose budget a request spends, and where its key came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub key: Key,
    pub source: Source,
}

/// Where a request's key came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The `api_key` query parameter.
    Query,
    /// An `Authorization: Bearer` token.
    Bearer,
    /// None on the request: the configured default key, to be injected upstream.
    Default,
    /// An app's token: the app's key, injected upstream in place of any the request carried.
    App,
}

/// The key a configured credential (a default key, an alias, an override) spends: a read token
/// stands for its `aud` key, exactly as a request carrying it would.
pub fn budget_key(credential: &str) -> Key {
    Key::of(&auth::account_of(credential))
}

/// What is known about one request as it goes through the phases.
#[derive(Debug)]
pub struct RequestCtx {
    /// The client's `X-Request-Id` when well-formed, else a generated one; echoed in the answer.
    pub id: HeaderValue,
    /// When the proxy began to handle the request (the log line's `total_ms`).
    pub started: Instant,
    pub method: Method,
    /// The path alone: the query may carry a key, so it is never logged.
    pub path: String,
    /// A CORS preflight, answered by the proxy without a key.
    pub preflight: bool,
    /// Asked over HTTP/1.x (where `Connection: close` may be said).
    pub http1: bool,
    /// The budget the request spends, once identified.
    pub key: Option<Key>,
    /// The key's standing as the client is told it, once a token was taken or refused.
    pub rate: Option<RateState>,
    /// Time queued for a token, from the request's first try (across any re-queue).
    pub waited: Duration,
    /// From sending upstream to the response headers, or to the failure.
    pub upstream_latency: Option<Duration>,
    /// Whether the upstream sent response headers.
    pub upstream_answered: bool,
    /// The pause an upstream 429 imposed on the key.
    pub upstream_429: Option<Duration>,
    /// What the answer's `Access-Control-Allow-Origin` says.
    pub cors: Cors,
    /// How the cache took part: its `X-Cache` and `Cache-Status` (none without a cache).
    pub cache: Option<(&'static str, Cow<'static, str>)>,
    /// The app whose token the request presented.
    pub app: Option<Arc<App>>,
}

/// What an upstream exchange taught a request's context. A cache fill runs in a task and a
/// context of its own; this carries its outcome back to the request that led it, so that
/// request's metric, status-page entry and headers say what its fill met upstream.
#[derive(Debug, Clone, Copy, Default)]
pub struct Exchanged {
    pub answered: bool,
    pub rate: Option<RateState>,
    pub upstream_429: Option<Duration>,
    pub latency: Option<Duration>,
}

impl RequestCtx {
    /// What this context's upstream exchange learned.
    pub fn exchanged(&self) -> Exchanged {
        Exchanged {
            answered: self.upstream_answered,
            rate: self.rate,
            upstream_429: self.upstream_429,
            latency: self.upstream_latency,
        }
    }

    /// Takes on what the exchange of a fill this request led learned.
    pub fn take_exchanged(&mut self, exchanged: Exchanged) {
        self.upstream_answered = exchanged.answered;
        self.rate = exchanged.rate.or(self.rate);
        self.upstream_429 = exchanged.upstream_429;
        self.upstream_latency = exchanged.latency;
    }

    /// The context of a request that has just arrived.
    pub fn new(id: HeaderValue, method: &Method, path: &str) -> Self {
        Self {
            id,
            started: Instant::now(),
            method: method.clone(),
            path: path.to_owned(),
            preflight: false,
            http1: false,
            key: None,
            rate: None,
            waited: Duration::ZERO,
            upstream_latency: None,
            upstream_answered: false,
            upstream_429: None,
            cors: Cors::Any,
            cache: None,
            app: None,
        }
    }
}
