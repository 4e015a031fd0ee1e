//! The proxy: takes a client request, runs the phases in order, and always answers exactly once.
//!
//! [`Proxy::handle`] is infallible and callable without sockets; the server module only feeds it.

pub mod body;
pub mod headers;
pub mod phases;

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use tokio::time::Instant;
use tracing::Instrument;

use crate::config::{Config, Secret, UpstreamConfig};
use crate::error::ProxyError;
use crate::limiter::{Admission, Key, Limiter, Policy, Rejection};
use crate::metrics::{Metrics, Outcome};
use crate::upstream::{BoxError, BuildError, Upstream};
pub use body::ProxyBody;
use headers::{RateState, X_REQUEST_ID};
use phases::RequestRules;

/// How often a request may queue again because its token no longer fitted by the time it had a
/// connection (a slow or saturated upstream); then it is answered 429.
const MAX_ADMISSION_ATTEMPTS: u32 = 4;

/// The proxy, cheap to clone: every connection holds one.
#[derive(Debug, Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    limiter: Arc<Limiter>,
    /// What a reload replaces; read once per request.
    settings: ArcSwap<Settings>,
    metrics: Metrics,
    /// Upstream bodies broken mid-stream, across upstream rebuilds.
    broken_bodies: Arc<AtomicU64>,
    /// False once shutdown began: `/readyz` answers 503 so load balancers stop sending.
    ready: AtomicBool,
    /// Seed and counter for generated request ids.
    id_seed: RandomState,
    id_counter: AtomicU64,
}

/// The reloadable part of the proxy.
#[derive(Debug)]
struct Settings {
    upstream: Upstream,
    /// The configuration `upstream` was built from, to rebuild it only when it changed.
    upstream_cfg: UpstreamConfig,
    rules: RequestRules,
    legacy_headers: bool,
    default_key: Option<Secret>,
    /// Alias of each key named in `[keys.aliases]`: the only per-key metric label.
    aliases: HashMap<Key, Arc<str>>,
}

impl Settings {
    /// Settings for `cfg`, reusing `current`'s upstream pool when its configuration is unchanged.
    fn new(
        cfg: &Config,
        current: Option<&Settings>,
        broken_bodies: &Arc<AtomicU64>,
    ) -> Result<Self, BuildError> {
        let upstream = match current {
            Some(current) if current.upstream_cfg.connects_like(&cfg.upstream) => {
                current.upstream.clone()
            }
            _ => Upstream::new(&cfg.upstream, broken_bodies.clone())?,
        };
        let default_key = cfg.keys.default_api_key.clone();
        let rules = RequestRules {
            upstream: upstream.base().clone(),
            default_key: default_key
                .as_ref()
                .map(|secret| Key::from_credential(secret.expose())),
            paths: cfg.upstream.paths.clone(),
            savers: cfg.quota_savers,
        };
        let aliases = cfg
            .keys
            .aliases
            .iter()
            .map(|(alias, secret)| {
                (
                    Key::of_configured(secret.expose()),
                    Arc::from(alias.as_str()),
                )
            })
            .collect();
        Ok(Self {
            upstream,
            upstream_cfg: cfg.upstream.clone(),
            rules,
            legacy_headers: cfg.limit.legacy_headers,
            default_key,
            aliases,
        })
    }
}

/// The metric outcome of a request the proxy answered itself.
fn outcome_of(error: &ProxyError) -> Outcome {
    match error {
        ProxyError::RateLimited(_) => Outcome::Limited,
        ProxyError::MissingKey
        | ProxyError::MethodNotAllowed(_)
        | ProxyError::ForeignTarget
        | ProxyError::PathNotAllowed
        | ProxyError::Refused(_) => Outcome::RejectedInvalid,
        ProxyError::Upstream(_)
        | ProxyError::UpstreamStatus { .. }
        | ProxyError::UpstreamRateLimited(_) => Outcome::UpstreamError,
    }
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
struct RequestLog {
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
        let broken_bodies = Arc::new(AtomicU64::new(0));
        let settings = Settings::new(cfg, None, &broken_bodies)?;
        Ok(Self {
            shared: Arc::new(Shared {
                limiter,
                settings: ArcSwap::from_pointee(settings),
                metrics: Metrics::new(),
                broken_bodies,
                ready: AtomicBool::new(true),
                id_seed: RandomState::new(),
                id_counter: AtomicU64::new(0),
            }),
        })
    }

    /// Puts a new (already validated) configuration in force without dropping connections:
    /// limits, keys, aliases, paths, quota savers and headers apply to requests from now on;
    /// buckets keep their state. The upstream pool is rebuilt only if `[upstream]` changed
    /// (requests in flight finish on the old one). Listen addresses, logging and the sweep
    /// interval are fixed at start.
    pub fn reload(&self, cfg: &Config) -> Result<(), BuildError> {
        let current = self.shared.settings.load_full();
        let settings = Settings::new(cfg, Some(&current), &self.shared.broken_bodies)?;
        self.shared.settings.store(Arc::new(settings));
        self.shared.limiter.set_policy(Policy::new(&cfg.limit));
        Ok(())
    }

    /// The limiter, for inspection (tests, metrics).
    pub fn limiter(&self) -> &Limiter {
        &self.shared.limiter
    }

    /// Upstream response bodies that broke after their headers had been passed on.
    pub fn broken_upstream_bodies(&self) -> u64 {
        self.shared.broken_bodies.load(Ordering::Relaxed)
    }

    /// The proxy's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// The metrics in Prometheus text format, gauges refreshed.
    pub fn render_metrics(&self) -> String {
        let shared = &*self.shared;
        shared.metrics.render(
            shared.limiter.waiting(),
            shared.limiter.active_keys(),
            shared.broken_bodies.load(Ordering::Relaxed),
        )
    }

    /// Whether the proxy takes new work (false once draining).
    pub fn is_ready(&self) -> bool {
        self.shared.ready.load(Ordering::Relaxed)
    }

    /// Starts draining for shutdown: not ready any more, and no queued request waits past
    /// `deadline` (those whose turn would come later get 429, code 25).
    pub fn begin_drain(&self, deadline: Instant) {
        self.shared.ready.store(false, Ordering::Relaxed);
        self.shared.limiter.drain(deadline);
    }

    /// Answers one client request. Never fails: every error becomes a TMDB status body. The
    /// request's id (its `X-Request-Id`, or a generated one) is on every log line of the request
    /// and echoed in the response.
    pub async fn handle<B>(&self, req: Request<B>, client: SocketAddr) -> Response<ProxyBody>
    where
        B: Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        let id = match req.headers().get(&X_REQUEST_ID) {
            Some(value) if headers::is_valid_request_id(value) => value.clone(),
            _ => self.next_request_id(),
        };
        let span = tracing::info_span!("request", id = %id.to_str().unwrap_or_default());
        let mut response = self.handle_in_span(req, client).instrument(span).await;
        response.headers_mut().insert(X_REQUEST_ID, id);
        response
    }

    fn next_request_id(&self) -> HeaderValue {
        let n = self.shared.id_counter.fetch_add(1, Ordering::Relaxed);
        let id = self.shared.id_seed.hash_one(n);
        // Sixteen hex digits are always a valid header value.
        HeaderValue::from_str(&format!("{id:016x}")).unwrap_or(HeaderValue::from_static("0"))
    }

    async fn handle_in_span<B>(&self, req: Request<B>, client: SocketAddr) -> Response<ProxyBody>
    where
        B: Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        let started = Instant::now();
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let mut outcome = RequestLog {
            key: None,
            limited: false,
            waited: Duration::ZERO,
            upstream_latency: None,
        };
        if headers::is_preflight(req.method(), req.headers()) {
            // Answered here: a preflight carries no key and must not spend one.
            let mut response = Response::new(ProxyBody::full(Bytes::new()));
            *response.status_mut() = StatusCode::NO_CONTENT;
            headers::preflight_headers(req.headers(), response.headers_mut());
            tracing::info!(%method, %path, status = 204, "CORS preflight");
            return response;
        }
        let response = match self.process(req, client, &mut outcome).await {
            Ok(response) => {
                // TMDB's own 429 body passes through, but it is still an upstream refusal.
                if response.status() == StatusCode::TOO_MANY_REQUESTS {
                    self.record(Outcome::UpstreamError, Some(25), outcome.key);
                } else {
                    self.record(Outcome::Forwarded, None, outcome.key);
                }
                response
            }
            Err((error, rate)) => {
                self.record(
                    outcome_of(&error),
                    Some(error.body().status_code),
                    outcome.key,
                );
                let mut response = error.into_response();
                if let Some(rate) = rate {
                    headers::insert_rate_limit(
                        response.headers_mut(),
                        rate,
                        self.shared.settings.load().legacy_headers,
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
        let mut response = response;
        headers::insert_cors(response.headers_mut());
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

    fn record(&self, outcome: Outcome, code: Option<u16>, key: Option<Key>) {
        let settings = self.shared.settings.load();
        let alias = key.and_then(|k| settings.aliases.get(&k)).map(|a| &**a);
        self.shared.metrics.record_request(outcome, code, alias);
    }

    async fn process<B>(
        &self,
        req: Request<B>,
        client: SocketAddr,
        outcome: &mut RequestLog,
    ) -> Result<Response<ProxyBody>, (ProxyError, Option<RateState>)>
    where
        B: Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        let shared = &*self.shared;
        let settings = shared.settings.load_full();
        let (parts, body) = req.into_parts();
        let identity = phases::request_filter(&parts, &settings.rules).map_err(|e| {
            // A keyed request refused before spending anything still reports its key's state.
            let rate = match &e {
                ProxyError::Refused(_) => phases::identify(&parts, &settings.rules).map(|id| {
                    let (limit, remaining, reset_after) = shared.limiter.peek(id.key);
                    RateState {
                        limit,
                        remaining,
                        reset_after,
                    }
                }),
                _ => None,
            };
            (e, rate)
        })?;
        outcome.key = Some(identity.key);

        let rejected = |outcome: &mut RequestLog, rejection: Rejection| {
            outcome.limited = true;
            let rate = RateState {
                limit: rejection.limit,
                remaining: 0,
                reset_after: rejection.retry_after,
            };
            (ProxyError::RateLimited(rejection), Some(rate))
        };
        // Token first (queueing if need be), then a ready connection, then confirm the token's
        // stamp: the stamp must be the moment the request leaves, not when it began to wait. A
        // stamp that no longer fits means queueing again, without holding the connection.
        let admitted_rate = |a: Admission| RateState {
            limit: a.limit,
            remaining: a.remaining,
            reset_after: a.reset_after,
        };
        let queued_since = Instant::now();
        let mut attempt = 0;
        let (admission, lease) = loop {
            attempt += 1;
            let ticket = match shared
                .limiter
                .acquire(identity.key, queued_since.elapsed())
                .await
            {
                Ok(ticket) => ticket,
                Err(rejection) => return Err(rejected(outcome, rejection)),
            };
            let lease = settings
                .upstream
                .checkout(settings.upstream.deadline())
                .await
                .map_err(|e| (ProxyError::from(e), Some(admitted_rate(ticket.admission()))))?;
            match ticket.confirm() {
                Ok(admission) => break (admission, lease),
                Err(rejection) if attempt >= MAX_ADMISSION_ATTEMPTS => {
                    return Err(rejected(outcome, rejection));
                }
                Err(_) => drop(lease),
            }
        };
        outcome.waited = admission.waited;
        let rate = admitted_rate(admission);
        let deadline = settings.upstream.deadline();

        let upstream_req = phases::upstream_request(
            parts,
            body,
            identity,
            &settings.rules.upstream,
            settings.default_key.as_ref(),
            client.ip(),
        )
        .map_err(|e| (e, Some(rate)))?;
        let sent = Instant::now();
        let result = settings.upstream.send(lease, upstream_req, deadline).await;
        outcome.upstream_latency = Some(sent.elapsed());
        if result.is_ok() {
            shared.metrics.record_upstream_latency(sent.elapsed());
        }
        let response = result.map_err(|e| (ProxyError::from(e), Some(rate)))?;

        // An upstream 429 means the budget was wrong (another consumer, a tighter limit): hold
        // the key back for as long as the upstream asked instead of hammering it.
        let upstream_429 = (response.status() == StatusCode::TOO_MANY_REQUESTS)
            .then(|| phases::upstream_retry_after(response.headers()));
        let mut rate = rate;
        if let Some(wait) = upstream_429 {
            shared.metrics.record_upstream_429();
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
        headers::insert_rate_limit(response.headers_mut(), rate, settings.legacy_headers);
        Ok(response)
    }
}
