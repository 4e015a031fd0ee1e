//! The proxy: takes a client request, runs the phases in order, and always answers exactly once.
//!
//! [`Proxy::handle`] is infallible and callable without sockets; the server module only feeds it.

pub mod body;
pub mod headers;
pub mod phases;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Body;
use tokio::time::Instant;

use crate::config::{Config, LimitConfig, Secret};
use crate::error::ProxyError;
use crate::limiter::{Admission, Key, Limiter, Rejection};
use crate::upstream::{BoxError, BuildError, Upstream};
pub use body::ProxyBody;
use headers::RateState;
use phases::RequestRules;

/// The proxy, cheap to clone: every connection holds one.
#[derive(Debug, Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    limiter: Arc<Limiter>,
    upstream: Upstream,
    rules: RequestRules,
    limit: LimitConfig,
    default_key: Option<Secret>,
}

/// A key's fingerprint in logs, `-` for a request without one.
struct KeyLabel(Option<Key>);

impl std::fmt::Display for KeyLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(key) => key.fingerprint().fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// What the request log line says about one request.
struct Outcome {
    key: Option<Key>,
    limited: bool,
    waited: Duration,
    upstream_latency: Option<Duration>,
}

// === impl Proxy ===

impl Proxy {
    /// Builds the proxy and starts the idle-bucket sweeper. Must run inside a tokio runtime.
    pub fn new(cfg: &Config) -> Result<Self, BuildError> {
        let limiter = Arc::new(Limiter::new(&cfg.limit));
        Limiter::spawn_sweeper(&limiter, cfg.limit.sweep_interval);
        let upstream = Upstream::new(&cfg.upstream)?;
        let default_key = cfg.keys.default_api_key.clone();
        let rules = RequestRules {
            upstream: upstream.base().clone(),
            default_key: default_key
                .as_ref()
                .map(|secret| Key::from_credential(secret.expose())),
            paths: cfg.upstream.paths.clone(),
            savers: cfg.quota_savers,
        };
        Ok(Self {
            shared: Arc::new(Shared {
                limiter,
                upstream,
                rules,
                limit: cfg.limit.clone(),
                default_key,
            }),
        })
    }

    /// The limiter, for inspection (tests, metrics).
    pub fn limiter(&self) -> &Limiter {
        &self.shared.limiter
    }

    /// The upstream client, for inspection (tests, metrics).
    pub fn upstream(&self) -> &Upstream {
        &self.shared.upstream
    }

    /// Answers one client request. Never fails: every error becomes a TMDB status body.
    pub async fn handle<B>(&self, req: Request<B>, client: SocketAddr) -> Response<ProxyBody>
    where
        B: Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        let started = Instant::now();
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let mut outcome = Outcome {
            key: None,
            limited: false,
            waited: Duration::ZERO,
            upstream_latency: None,
        };
        let response = match self.process(req, client, &mut outcome).await {
            Ok(response) => response,
            Err((error, rate)) => {
                let mut response = error.into_response();
                if let Some(rate) = rate {
                    headers::insert_rate_limit(
                        response.headers_mut(),
                        rate,
                        self.shared.limit.legacy_headers,
                    );
                }
                match &error {
                    ProxyError::Upstream(_) => {
                        tracing::warn!(%method, %path, error = %error, "upstream request failed");
                    }
                    ProxyError::RateLimited(_) => {}
                    _ => tracing::debug!(%method, %path, error = %error, "request refused"),
                }
                response
            }
        };
        tracing::info!(
            %method,
            %path,
            status = response.status().as_u16(),
            key = %KeyLabel(outcome.key),
            limited = outcome.limited,
            waited_ms = outcome.waited.as_millis() as u64,
            upstream_ms = outcome.upstream_latency.map(|d| d.as_millis() as u64),
            total_ms = started.elapsed().as_millis() as u64,
            "request"
        );
        response
    }

    async fn process<B>(
        &self,
        req: Request<B>,
        client: SocketAddr,
        outcome: &mut Outcome,
    ) -> Result<Response<ProxyBody>, (ProxyError, Option<RateState>)>
    where
        B: Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        let shared = &*self.shared;
        let (parts, body) = req.into_parts();
        let identity = phases::request_filter(&parts, &shared.rules).map_err(|e| (e, None))?;
        outcome.key = Some(identity.key);

        let rejected = |outcome: &mut Outcome, rejection: Rejection| {
            outcome.limited = true;
            let rate = RateState {
                limit: rejection.limit,
                remaining: 0,
                reset_after: rejection.retry_after,
            };
            (ProxyError::RateLimited(rejection), Some(rate))
        };
        // Token first (queueing if need be), then a ready connection, then confirm the token's
        // stamp: the stamp must be the moment the request leaves, not when it began to wait.
        let ticket = match shared.limiter.acquire(identity.key).await {
            Ok(ticket) => ticket,
            Err(rejection) => return Err(rejected(outcome, rejection)),
        };
        let deadline = shared.upstream.deadline();
        let admitted_rate = |a: Admission| RateState {
            limit: a.limit,
            remaining: a.remaining,
            reset_after: a.reset_after,
        };
        let lease = shared
            .upstream
            .checkout(deadline)
            .await
            .map_err(|e| (ProxyError::from(e), Some(admitted_rate(ticket.admission()))))?;
        let admission = match ticket.confirm().await {
            Ok(ticket) => ticket.sent(),
            Err(rejection) => return Err(rejected(outcome, rejection)),
        };
        outcome.waited = admission.waited;
        let rate = admitted_rate(admission);

        let upstream_req = phases::upstream_request(
            parts,
            body,
            identity,
            &shared.rules.upstream,
            shared.default_key.as_ref(),
            client.ip(),
        )
        .map_err(|e| (e, Some(rate)))?;
        let sent = Instant::now();
        let result = shared.upstream.send(lease, upstream_req, deadline).await;
        outcome.upstream_latency = Some(sent.elapsed());
        let response = result.map_err(|e| (ProxyError::from(e), Some(rate)))?;

        // An upstream 429 means the budget was wrong (another consumer, a tighter limit): hold
        // the key back for as long as the upstream asked instead of hammering it.
        let upstream_429 = (response.status() == StatusCode::TOO_MANY_REQUESTS)
            .then(|| phases::upstream_retry_after(response.headers()));
        let mut rate = rate;
        if let Some(wait) = upstream_429 {
            outcome.limited = true;
            rate.remaining = 0;
            rate.reset_after = wait;
            if shared.limiter.pause(identity.key, wait) {
                tracing::warn!(
                    key = %identity.key.fingerprint(),
                    pause = ?wait,
                    "upstream answered 429; pausing this key"
                );
            }
        }
        let mut response = phases::response_filter(response, rate, upstream_429, deadline)
            .await
            .map_err(|e| (e, Some(rate)))?;
        headers::insert_rate_limit(response.headers_mut(), rate, shared.limit.legacy_headers);
        Ok(response)
    }
}
