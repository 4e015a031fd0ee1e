//! The proxy: takes a client request, runs the phases in order, and always answers exactly once.
//!
//! [`Proxy::handle`] is infallible and callable without sockets; the server module only feeds it.
//! Every request goes `handle → process → finish`:
//! - [`Proxy::process`] runs the phases in order, filling the request's [`RequestCtx`]:
//!   `request_filter` (never forwarded? whose budget? what TMDB would refuse?) →
//!   `upstream_request` → the [`admission`] step (token, ready connection, confirm) → send →
//!   `response_filter`. It returns the upstream's answer or the [`ProxyError`] that stopped it.
//! - [`Proxy::finish`] is the one exit: it turns an error into TMDB's body, then writes the
//!   rate-limit fields, `Retry-After`, CORS and `X-Request-Id`, the metric and the log line, once,
//!   for every outcome.

pub mod admission;
pub mod body;
mod cached;
pub mod ctx;
pub mod guard;
pub mod headers;
pub mod phases;
mod settings;

use std::hash::{BuildHasher, RandomState};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::CONNECTION;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use tokio::time::Instant;
use tracing::Instrument;

use crate::cache;
use crate::config::Config;
use crate::error::ProxyError;
use crate::limiter::{Budget, Grant, Key, LocalBudget, Mode, Policy, Reason, SharedBudget};
use crate::metrics::{self, Metrics, Outcome};
use crate::status::{self, CacheView, ClusterView, History, SeriesView, Status, UpstreamView};
use crate::tmdb::Query;
use crate::tmdb::status::code;
use crate::upstream::{BoxError, BuildError, Dialer, Lease, Sent, UpstreamBody, UpstreamError};
use admission::Admission;
pub use body::ProxyBody;
pub use ctx::RequestCtx;
use ctx::{Identity, Source, budget_key};
use headers::X_REQUEST_ID;
use settings::Settings;

/// The proxy, cheap to clone: every connection holds one.
#[derive(Debug, Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
}

struct Shared {
    admission: Admission,
    /// What a reload replaces; read once per request.
    settings: ArcSwap<Settings>,
    metrics: Metrics,
    /// Upstream bodies broken mid-stream, across upstream rebuilds.
    broken_bodies: Arc<AtomicU64>,
    /// False once shutdown began: `/readyz` answers 503 so load balancers stop sending.
    ready: AtomicBool,
    /// `cluster.require_redis`: not ready while the shared budget is local.
    require_redis: bool,
    /// Seed and counter for generated request ids.
    id_seed: RandomState,
    id_counter: AtomicU64,
    /// Reaches the upstream in memory instead of over the network (tests on paused time).
    dialer: Option<Dialer>,
    /// The last minute, per second, for the status page.
    history: History,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("admission", &self.admission)
            .field("settings", &self.settings)
            .field("ready", &self.ready)
            .field("in_memory", &self.dialer.is_some())
            .finish_non_exhaustive()
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

// === impl Proxy ===

impl Proxy {
    /// Builds the proxy and starts the idle-bucket sweeper. Must run inside a tokio runtime.
    pub fn new(cfg: &Config) -> Result<Self, BuildError> {
        Self::build(cfg, None)
    }

    /// A proxy whose upstream connections are opened by `dialer` instead of the network: tests on
    /// paused time, against the in-process stand-in (`Sim::dialer`).
    pub fn in_memory(cfg: &Config, dialer: Dialer) -> Result<Self, BuildError> {
        Self::build(cfg, Some(dialer))
    }

    fn build(cfg: &Config, dialer: Option<Dialer>) -> Result<Self, BuildError> {
        let policy = Policy::new(&cfg.limit, budget_key);
        let metrics = match cfg.cluster.store {
            Some(_) => Metrics::with_cluster(),
            None => Metrics::new(),
        };
        let budget: Arc<dyn Budget> = match &cfg.cluster.store {
            Some(store) => Arc::new(
                SharedBudget::new(&cfg.cluster, store, policy, metrics.redis_call_observer())
                    .map_err(|e| BuildError::Cluster(e.to_string()))?,
            ),
            None => {
                let local = Arc::new(LocalBudget::new(policy));
                LocalBudget::spawn_sweeper(&local, cfg.limit.sweep_interval);
                local
            }
        };
        let broken_bodies = Arc::new(AtomicU64::new(0));
        let settings = Settings::new(cfg, None, &broken_bodies, dialer.as_ref())?;
        Ok(Self {
            shared: Arc::new(Shared {
                admission: Admission::new(budget),
                settings: ArcSwap::from_pointee(settings),
                metrics,
                broken_bodies,
                ready: AtomicBool::new(true),
                require_redis: cfg.cluster.require_redis,
                id_seed: RandomState::new(),
                id_counter: AtomicU64::new(0),
                dialer,
                history: History::new(Instant::now()),
            }),
        })
    }

    /// Puts a new (already validated) configuration in force without dropping connections:
    /// limits, keys, aliases, paths, quota savers and headers apply to requests from now on;
    /// buckets keep their state. The upstream pool is rebuilt only if `[upstream]`'s connection
    /// settings changed (requests in flight finish on the old one). What needs a restart instead
    /// is listed by [`Config::restart_required`].
    pub fn reload(&self, cfg: &Config) -> Result<(), BuildError> {
        let shared = &*self.shared;
        let current = shared.settings.load_full();
        let settings = Settings::new(
            cfg,
            Some(&current),
            &shared.broken_bodies,
            shared.dialer.as_ref(),
        )?;
        shared.settings.store(Arc::new(settings));
        shared
            .admission
            .budget()
            .set_policy(Policy::new(&cfg.limit, budget_key));
        Ok(())
    }

    /// The budget requests are admitted against (tests, metrics).
    pub fn budget(&self) -> &dyn Budget {
        self.shared.admission.budget()
    }

    /// Requests asleep in a key's queue now.
    pub fn queued(&self) -> usize {
        self.shared.admission.queued()
    }

    /// Upstream response bodies that broke after their headers had been passed on.
    pub fn broken_upstream_bodies(&self) -> u64 {
        self.shared.broken_bodies.load(Ordering::Relaxed)
    }

    /// The proxy's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// The metrics in Prometheus's classic text format, gauges refreshed.
    pub fn render_metrics(&self) -> String {
        self.render_metrics_as(metrics::Format::Text)
    }

    /// The metrics in `format`, gauges refreshed.
    pub fn render_metrics_as(&self, format: metrics::Format) -> String {
        let shared = &*self.shared;
        let settings = shared.settings.load();
        let budget = shared.admission.budget();
        let now = Instant::now();
        let readings = metrics::Readings {
            queue_waiting: shared.admission.queued(),
            active_buckets: budget.tracked_keys(),
            broken_bodies: shared.broken_bodies.load(Ordering::Relaxed),
            pauses: shared.admission.pauses(),
            connections: settings.upstream.connections(),
            key_limits: (settings.aliases.iter())
                .map(|(key, alias)| (alias.to_string(), budget.peek(*key, now).limit))
                .collect(),
            cluster: budget.shared().map(SharedBudget::figures),
            cache: settings.cache.as_ref().map(|cache| cache.figures()),
        };
        shared.metrics.render(format, readings)
    }

    /// What the status page shows: the last minute per second for the whole proxy, each key
    /// alias and each app, and the gauges beside them.
    pub fn status(&self) -> Status {
        let shared = &*self.shared;
        let settings = shared.settings.load();
        let budget = shared.admission.budget();
        let history = &shared.history;
        let now = Instant::now();
        let mut aliases: Vec<_> = settings.aliases.iter().collect();
        aliases.sort_by(|a, b| a.1.cmp(b.1));
        let keys = (aliases.into_iter())
            .map(|(key, alias)| SeriesView {
                limit: Some(budget.peek(*key, now).limit),
                ..history.key(alias, now)
            })
            .collect();
        let apps = (settings.apps.all().iter())
            .map(|app| SeriesView {
                limit: app.lane.cap(app.index),
                queued: Some(app.lane.queued(app.index)),
                ..history.app(&app.name, now)
            })
            .collect();
        let connections = settings.upstream.connections();
        Status {
            version: env!("CARGO_PKG_VERSION"),
            uptime_seconds: history.uptime(now).as_secs(),
            ready: self.readiness().0,
            all: SeriesView {
                queued: Some(shared.admission.queued()),
                ..history.all(now)
            },
            keys,
            apps,
            queue_waiting: shared.admission.queued(),
            upstream: UpstreamView {
                busy: connections.busy,
                idle: connections.idle,
                max: connections.max,
                pauses: shared.admission.pauses(),
            },
            cache: settings.cache.as_ref().map(|cache| {
                let figures = cache.figures();
                let looked = figures.hits + figures.misses;
                CacheView {
                    hits: figures.hits,
                    misses: figures.misses,
                    hit_ratio: (looked > 0).then(|| figures.hits as f64 / looked as f64),
                    entries: figures.entries,
                    bytes: figures.bytes,
                    max_bytes: cache.config().max_size,
                }
            }),
            cluster: budget.shared().map(|shared| {
                let figures = shared.figures();
                ClusterView {
                    mode: match shared.mode() {
                        Mode::Shared => "shared",
                        Mode::Local => "local",
                    },
                    redis_calls_ok: figures.calls_ok,
                    redis_calls_failed: figures.calls_failed + figures.calls_timed_out,
                }
            }),
        }
    }

    /// `/readyz`: whether the proxy takes new work, and what to say. With a shared budget the
    /// answer names its mode; while it is local, `cluster.require_redis` makes it not ready
    /// (requests are still served on the local share).
    pub fn readiness(&self) -> (bool, &'static str) {
        if !self.is_ready() {
            return (false, "draining\n");
        }
        match self.budget().shared().map(|budget| budget.mode()) {
            None => (true, "ready\n"),
            Some(Mode::Shared) => (true, "ready\nbudget: shared\n"),
            Some(Mode::Local) if self.shared.require_redis => (
                false,
                "not ready\nbudget: local (Redis does not answer; cluster.require_redis is on)\n",
            ),
            Some(Mode::Local) => (true, "ready\nbudget: local (Redis does not answer)\n"),
        }
    }

    /// Empties the response cache of entries whose key starts with `prefix` (a path such as
    /// `/3/movie/550`; `""` for all); returns how many were removed.
    pub fn purge_cache(&self, prefix: &str) -> u64 {
        let settings = self.shared.settings.load();
        settings
            .cache
            .as_ref()
            .map_or(0, |cache| cache.purge(prefix))
    }

    /// Entries in the response cache and their bytes (`None` without a cache).
    pub fn cache_size(&self) -> Option<(u64, u64)> {
        self.shared
            .settings
            .load()
            .cache
            .as_ref()
            .map(|cache| cache.size())
    }

    /// Whether the proxy takes new work (false once draining).
    pub fn is_ready(&self) -> bool {
        self.shared.ready.load(Ordering::Relaxed)
    }

    /// Starts draining for shutdown: not ready any more, no queued request waits past
    /// `queue_until` (those whose turn would come later get 429, code 25), and one still waiting
    /// for the upstream at `answer_by` gets 504 (code 24) then.
    pub fn begin_drain(&self, queue_until: Instant, answer_by: Instant) {
        self.shared.ready.store(false, Ordering::Relaxed);
        self.shared.admission.drain(queue_until, answer_by);
    }

    /// Answers one client request. Never fails: every error becomes a TMDB status body. The
    /// request's id (its `X-Request-Id`, or a generated one) is on every log line of the request
    /// and echoed in the response.
    pub async fn handle<B>(&self, req: Request<B>, client: SocketAddr) -> Response<ProxyBody>
    where
        B: Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        let id = self.request_id(req.headers());
        let span = tracing::info_span!("request", id = %id.to_str().unwrap_or_default());
        let mut ctx = RequestCtx::new(id, req.method(), req.uri().path());
        ctx.http1 = req.version() < http::Version::HTTP_2;
        async move {
            let settings = self.shared.settings.load_full();
            let result = self.process(&settings, req, client, &mut ctx).await;
            self.finish(&settings, ctx, result)
        }
        .instrument(span)
        .await
    }

    /// The client's request id when it is safe to keep, else a new one.
    fn request_id(&self, headers: &HeaderMap) -> HeaderValue {
        match headers.get(&X_REQUEST_ID) {
            Some(value) if headers::is_valid_request_id(value) => value.clone(),
            _ => {
                let n = self.shared.id_counter.fetch_add(1, Ordering::Relaxed);
                let id = self.shared.id_seed.hash_one(n);
                // Sixteen hex digits are always a valid header value.
                HeaderValue::from_str(&format!("{id:016x}"))
                    .unwrap_or(HeaderValue::from_static("0"))
            }
        }
    }

    /// The phases, in order. Each step that learns something about the request notes it in
    /// `ctx`; the first that fails ends the request with its error.
    async fn process<B>(
        &self,
        settings: &Arc<Settings>,
        req: Request<B>,
        client: SocketAddr,
        ctx: &mut RequestCtx,
    ) -> Result<Response<ProxyBody>, ProxyError>
    where
        B: Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        let (mut parts, body) = req.into_parts();
        phases::check_size(&parts, settings.max_header_bytes)?;
        if headers::is_preflight(&parts.method, &parts.headers) {
            ctx.preflight = true;
            if let Some(guard) = &settings.guard {
                ctx.cors = guard.cors(&parts.headers);
            }
            return Ok(phases::preflight(&parts.headers));
        }
        // request_filter: never forwarded, ambiguous, whose budget, what TMDB would refuse. The
        // query is split once, here, and read by every step that needs it.
        // An app's token is read (and removed) first: a known one decides the key.
        let app = settings.apps.identify(&mut parts.headers)?;
        if let Some(app) = &app {
            phases::send_as_app(&mut parts.headers, app);
        }
        let (identity, target, cache_key) = {
            let query = Query::parse(parts.uri.query());
            phases::check_target(&parts, &settings.rules)?;
            let identity = match &app {
                Some(app) => Identity {
                    key: app.key,
                    source: Source::App,
                },
                None => {
                    phases::check_credentials(&query, &parts.headers)?;
                    phases::identify(&parts.headers, &query, settings.rules.default_key)?
                }
            };
            ctx.key = Some(identity.key);
            ctx.app = app.clone();
            if let (Source::Default, Some(guard)) = (identity.source, &settings.guard) {
                ctx.cors = guard.cors(&parts.headers);
                guard.admit(&parts)?;
            }
            phases::check_query(&query, settings.rules.savers)?;
            let inject = match (identity.source, &app) {
                (Source::App, Some(app)) => Some((&app.credential, !app.bearer)),
                (Source::Default, _) => settings.default_key.as_ref().map(|key| (key, true)),
                _ => None,
            };
            let target = phases::upstream_target(&parts.uri, &query, inject);
            let cache_key = settings.cache.as_ref().map(|cache| {
                let honor = cache.config().honor_client_no_cache;
                cache::rules::key(
                    &parts.method,
                    parts.uri.path(),
                    &query,
                    &parts.headers,
                    honor,
                )
            });
            (identity, target, cache_key)
        };
        let plan = cached::plan(settings, cache_key, &mut parts, ctx);
        // Read whole before it may spend a token or hold an upstream connection.
        let body_by = ctx.started + settings.body_timeout;
        let body =
            phases::read_request_body(body, &parts.headers, settings.max_request_body, body_by)
                .await?;
        let upstream_req =
            phases::upstream_request(parts, body, target, &settings.rules.upstream, client.ip())?;
        match plan {
            Some(plan) => {
                self.through_cache(settings, plan, identity, upstream_req, ctx)
                    .await
            }
            None => {
                self.send_through(settings, identity, upstream_req, ctx)
                    .await
            }
        }
    }

    /// Admits the request (token, then connection), sends it and passes on the answer.
    async fn send_through(
        &self,
        settings: &Settings,
        identity: Identity,
        upstream_req: Request<UpstreamBody>,
        ctx: &mut RequestCtx,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let admission = &self.shared.admission;
        let (lease, deadline, grant) = admission
            .admit(identity.key, settings.max_wait, &settings.upstream, ctx)
            .await?;

        let exchange = Exchange {
            lease,
            req: upstream_req,
            grant,
            key: identity.key,
            deadline,
        };
        // A shutdown's grace period ends with an answer, not an empty reply.
        let mut response = tokio::select! {
            response = self.exchange(settings, exchange, ctx) => response?,
            () = admission.cut_off() => {
                return Err(UpstreamError::Timeout(settings.upstream.request_timeout()).into());
            }
        };
        if matches!(identity.source, Source::Default | Source::App) {
            phases::strip_injected_key(response.headers_mut());
        }
        Ok(response)
    }

    /// Sends the request and passes on the upstream's answer (`response_filter`), noting its
    /// timing and any pause an upstream 429 imposes.
    async fn exchange(
        &self,
        settings: &Settings,
        exchange: Exchange,
        ctx: &mut RequestCtx,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let Exchange {
            lease,
            req,
            mut grant,
            key,
            deadline,
        } = exchange;
        let (admission, upstream) = (&self.shared.admission, &settings.upstream);
        let sent = Instant::now();
        let mut result = upstream.send(lease, req, deadline).await;
        // Its pooled connection was stale, so the request leaves later than planned: its token is
        // confirmed again first.
        if let Ok(Sent::Stale(fresh, req)) = result {
            admission.reconfirm(&mut grant, ctx).await?;
            result = upstream.send(fresh, req, deadline).await;
        }
        ctx.upstream_latency = Some(sent.elapsed());
        let response = match result? {
            Sent::Answered(response) => response,
            Sent::Stale(..) => {
                return Err(UpstreamError::Failed("a fresh connection was stale".into()).into());
            }
        };
        ctx.upstream_answered = true;
        let upstream_429 = (response.status() == StatusCode::TOO_MANY_REQUESTS).then(|| {
            let wait = headers::upstream_retry_after(response.headers());
            admission.upstream_refused(key, wait, ctx)
        });
        phases::response_filter(response, upstream_429, settings.delivery, deadline).await
    }

    /// The one exit: every request's answer gets its headers, metric and log line here.
    fn finish(
        &self,
        settings: &Settings,
        mut ctx: RequestCtx,
        result: Result<Response<ProxyBody>, ProxyError>,
    ) -> Response<ProxyBody> {
        let (outcome, tmdb_code) = classify(&ctx, &result);
        let limited =
            ctx.upstream_429.is_some() || matches!(result, Err(ProxyError::RateLimited(_)));
        // The request's body was refused or broke before its end: the rest is never read, so
        // the connection cannot carry another request. Saying so keeps a client's pool from
        // sending its next request on a connection about to close.
        let unread_body = matches!(
            result,
            Err(ProxyError::BodyTooLarge | ProxyError::BodyTimeout | ProxyError::BodyBroken(_))
        );
        let mut response = match result {
            Ok(response) => response,
            Err(error) => {
                let (method, path) = (&ctx.method, &ctx.path);
                match &error {
                    ProxyError::Upstream(_) => {
                        tracing::warn!(%method, %path, %error, "upstream request failed");
                    }
                    // Over a limit is routine: the request line says `limited`.
                    ProxyError::RateLimited(refusal)
                        if refusal.reason != Reason::UpstreamRateLimited => {}
                    _ => tracing::debug!(%method, %path, %error, "request refused"),
                }
                error.to_response().map(ProxyBody::full)
            }
        };
        let status = response.status();
        // Every keyed answer carries the key's standing, refused requests included.
        let rate = ctx.key.map(|key| {
            ctx.rate
                .unwrap_or_else(|| self.shared.admission.standing(key))
        });
        let out = response.headers_mut();
        if let Some(rate) = rate {
            headers::insert_rate_limit(out, rate, settings.legacy_headers);
        }
        if status == StatusCode::TOO_MANY_REQUESTS {
            headers::ensure_retry_after(out, rate.map(|r| r.reset_after).unwrap_or_default());
        } else if status == StatusCode::SERVICE_UNAVAILABLE {
            headers::ensure_retry_after(out, std::time::Duration::from_secs(1));
        }
        headers::insert_cors(out, &ctx.cors);
        out.insert(X_REQUEST_ID, ctx.id.clone());
        if unread_body && ctx.http1 {
            out.insert(CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some((x_cache, cache_status)) = ctx.cache.take() {
            cache::status_headers(out, x_cache, cache_status);
        }
        // TMDB refused the key: it may not read the cache any more.
        if let (true, StatusCode::UNAUTHORIZED, Some(key)) =
            (ctx.upstream_answered, status, ctx.key)
        {
            self.shared.admission.forget(key);
        }

        if let (true, Some(key)) = (ctx.upstream_answered && status.is_success(), ctx.key) {
            self.shared.admission.succeeded(key);
        }
        let metrics = &self.shared.metrics;
        let alias = settings.alias(ctx.key);
        metrics.record_request(outcome, tmdb_code, alias);
        let finished = status::Finished {
            // Timed from the moment it was sent: set for every request that left.
            sent: ctx.upstream_latency.is_some(),
            limited: outcome == Outcome::Limited,
            upstream_429: ctx.upstream_429.is_some(),
        };
        let app_name = ctx.app.as_ref().map(|app| &app.name);
        self.shared
            .history
            .record(Instant::now(), alias, app_name, finished);
        let app = ctx.app.as_ref().map(|app| &*app.name);
        if let Some(app) = app {
            metrics.record_app(app, outcome, ctx.waited);
        }
        if ctx.upstream_429.is_some() {
            metrics.record_upstream_429();
        }
        if let (true, Some(latency)) = (ctx.upstream_answered, ctx.upstream_latency) {
            metrics.record_upstream_latency(latency);
        }
        tracing::info!(
            method = %ctx.method,
            path = %ctx.path,
            status = status.as_u16(),
            key = %KeyLabel(ctx.key),
            app = app.unwrap_or("-"),
            limited,
            waited_ms = ctx.waited.as_millis() as u64,
            upstream_ms = ctx.upstream_latency.map(|d| d.as_millis() as u64),
            total_ms = ctx.started.elapsed().as_millis() as u64,
            "request"
        );
        response
    }
}

/// A request admitted and ready to go: its connection, the rewritten request, its tokens, and
/// the deadline for the upstream's answer.
struct Exchange {
    lease: Lease,
    req: Request<UpstreamBody>,
    grant: Grant,
    key: Key,
    deadline: Instant,
}

/// What happened to a request, as the metric labels it, and the TMDB code its client got (none
/// when the upstream's own answer passed through).
fn classify(
    ctx: &RequestCtx,
    result: &Result<Response<ProxyBody>, ProxyError>,
) -> (Outcome, Option<u16>) {
    match result {
        Ok(_) if ctx.preflight => (Outcome::Preflight, None),
        // TMDB's own 429 body passes through, but it is still an upstream refusal.
        Ok(_) if ctx.upstream_429.is_some() => (Outcome::UpstreamError, Some(code::RATE_LIMITED)),
        Ok(_) => (Outcome::Forwarded, None),
        Err(error) => {
            let outcome = match error {
                ProxyError::RateLimited(refusal)
                    if refusal.reason == Reason::UpstreamRateLimited =>
                {
                    Outcome::UpstreamError
                }
                ProxyError::RateLimited(_) => Outcome::Limited,
                ProxyError::MissingKey
                | ProxyError::InvalidToken
                | ProxyError::MethodNotAllowed(_)
                | ProxyError::HeadersTooLarge
                | ProxyError::BodyTooLarge
                | ProxyError::BodyTimeout
                | ProxyError::BodyBroken(_)
                | ProxyError::ForeignTarget
                | ProxyError::HostNotAllowed
                | ProxyError::OriginNotAllowed
                | ProxyError::PathNotAllowed
                | ProxyError::Refused(_) => Outcome::RejectedInvalid,
                ProxyError::Upstream(_) | ProxyError::UpstreamStatus { .. } => {
                    Outcome::UpstreamError
                }
            };
            (outcome, Some(error.body().status_code))
        }
    }
}
