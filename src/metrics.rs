//! Prometheus metrics: names, labels, and thin record functions. No logic.
//!
//! `prometheus-client` keeps no global registry, so each [`Metrics`] is self-contained and tests
//! get fresh counters. Label values are bounded: outcomes and TMDB codes are fixed sets, and
//! per-key series exist only for keys an operator gave an alias (`[keys.aliases]`), never for a raw
//! key.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::limiter::shared::Figures;
use crate::upstream::Connections;

/// `Content-Type` of the `/metrics` answer in OpenMetrics, for scrapers that ask for it.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `Content-Type` of the `/metrics` answer in Prometheus's classic text format, the default.
pub const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The exposition formats `/metrics` speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus's classic text format (`text/plain; version=0.0.4`).
    Text,
    /// OpenMetrics 1.0 (`application/openmetrics-text`).
    OpenMetrics,
}

impl Format {
    /// The format a scraper's `Accept` header prefers: OpenMetrics when it ranks
    /// `application/openmetrics-text` at least as high as the classic format (as Prometheus does
    /// by default), the classic text format otherwise, and without an `Accept` (curl, promtool,
    /// older scrapers). `*/*` counts for the classic format; `q=0` refuses.
    pub fn negotiate(accept: Option<&str>) -> Self {
        let Some(accept) = accept else {
            return Self::Text;
        };
        let (mut open, mut text) = (0.0f32, 0.0f32);
        for range in accept.split(',') {
            let mut params = range.split(';').map(str::trim);
            let media = params.next().unwrap_or("");
            let q = params
                .filter_map(|param| {
                    let (name, value) = param.split_once('=')?;
                    name.trim()
                        .eq_ignore_ascii_case("q")
                        .then_some(value.trim())
                })
                .find_map(|value| value.parse::<f32>().ok())
                .unwrap_or(1.0);
            let is = |name: &str| media.eq_ignore_ascii_case(name);
            if is("application/openmetrics-text") {
                open = open.max(q);
            } else if is("text/plain") || is("text/*") || is("*/*") {
                text = text.max(q);
            }
        }
        if open > 0.0 && open >= text {
            Self::OpenMetrics
        } else {
            Self::Text
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::Text => TEXT,
            Self::OpenMetrics => OPENMETRICS,
        }
    }
}

/// OpenMetrics text as the classic format: a counter family is named with its `_total` suffix
/// (OpenMetrics names the family without it, so a classic parser would see `x_total` samples
/// with no HELP or TYPE), and the `# UNIT` and `# EOF` lines, which the classic format lacks,
/// are dropped.
fn classic(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            // Held until its TYPE line says whether the name takes `_total`.
            if let Some(held) = help.replace(rest) {
                push_line(&mut out, &["# HELP ", held]);
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let counter = rest
                .strip_suffix(" counter")
                .filter(|name| !name.ends_with("_total"));
            if let Some(held) = help.take() {
                match (counter, held.split_once(' ')) {
                    (Some(_), Some((name, text))) => {
                        push_line(&mut out, &["# HELP ", name, "_total ", text]);
                    }
                    _ => push_line(&mut out, &["# HELP ", held]),
                }
            }
            match (counter, rest.strip_suffix(" unknown")) {
                (Some(name), _) => push_line(&mut out, &["# TYPE ", name, "_total counter"]),
                // OpenMetrics' `unknown` is the classic format's `untyped`.
                (None, Some(name)) => push_line(&mut out, &["# TYPE ", name, " untyped"]),
                (None, None) => push_line(&mut out, &[line]),
            }
            continue;
        }
        if let Some(held) = help.take() {
            push_line(&mut out, &["# HELP ", held]);
        }
        push_line(&mut out, &[line]);
    }
    if let Some(held) = help {
        push_line(&mut out, &["# HELP ", held]);
    }
    out
}

fn push_line(out: &mut String, parts: &[&str]) {
    for part in parts {
        out.push_str(part);
    }
    out.push('\n');
}

/// What happened to a request, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream's answer was passed on (TMDB error JSON included).
    Forwarded,
    /// Answered 429 by the proxy's own limiter (or during an upstream-429 pause).
    Limited,
    /// Refused before spending a token: no key, bad page/date/appends, path, method, target.
    RejectedInvalid,
    /// The upstream failed, answered 429, or answered an error the proxy translated; labelled
    /// with the code the client got.
    UpstreamError,
    /// A CORS preflight, answered by the proxy without a key.
    Preflight,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Forwarded => "forwarded",
            Self::Limited => "limited",
            Self::RejectedInvalid => "rejected_invalid",
            Self::UpstreamError => "upstream_error",
            Self::Preflight => "preflight",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    outcome: &'static str,
    /// The TMDB status code the client got ("" when the upstream's answer passed through):
    /// encoded as the number, with nothing to allocate per request.
    code: Option<u16>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyLabels {
    alias: String,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AppLabels {
    app: String,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AppName {
    app: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// 1 ms to ~8 s: how long a request waited for its token.
fn wait_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 14))
}

/// All of the proxy's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    key_requests: Family<KeyLabels, Counter>,
    app_requests: Family<AppLabels, Counter>,
    app_wait: Histograms<AppName>,
    upstream_latency: Histogram,
    upstream_429: Counter,
    queue_waiting: Gauge,
    active_buckets: Gauge,
    client_connections: Gauge,
    broken_bodies: Counter,
    broken_seen: AtomicI64,
    pauses: Counter,
    upstream_connections: Family<StateLabels, Gauge>,
    upstream_max_connections: Gauge,
    key_limits: Family<AliasLabels, Gauge>,
    cluster: Option<ClusterMetrics>,
    cache: CacheMetrics,
}

/// The response cache's figures, as a scrape reads them.
#[derive(Debug, Clone, Copy, Default)]
pub struct CacheFigures {
    pub hits: u64,
    pub misses: u64,
    pub bypasses: u64,
    pub stale: u64,
    pub collapsed: u64,
    pub evictions: u64,
    pub entries: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AliasLabels {
    alias: String,
}

/// What a scrape reads from the proxy rather than counts as requests finish.
#[derive(Debug, Clone, Default)]
pub struct Readings {
    pub queue_waiting: usize,
    pub active_buckets: usize,
    pub broken_bodies: u64,
    /// Keys paused after an upstream 429, since start.
    pub pauses: u64,
    pub connections: Connections,
    /// Each alias of `[keys.aliases]` and its key's requests per second.
    pub key_limits: Vec<(String, u32)>,
    pub cluster: Option<Figures>,
    pub cache: Option<CacheFigures>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    result: &'static str,
}

/// Metrics of the response cache; the cache keeps its own counters and a scrape copies them.
#[derive(Debug, Default)]
struct CacheMetrics {
    answers: Family<CacheLabels, Counter>,
    evictions: Counter,
    entries: Gauge,
    bytes: Gauge,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabels {
    mode: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ToLabels {
    to: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    action: &'static str,
}

/// Metrics of the shared budget (registered only when `[cluster]` is on). The budget keeps
/// its own counters; a scrape copies them here.
#[derive(Debug)]
struct ClusterMetrics {
    mode: Family<ModeLabels, Gauge>,
    calls: Family<ResultLabels, Counter>,
    call_duration: Histogram,
    transitions: Family<ToLabels, Counter>,
    tokens: Family<ActionLabels, Counter>,
    decided_locally: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self::build(false)
    }

    /// With the shared budget's metrics too.
    pub fn with_cluster() -> Self {
        Self::build(true)
    }

    fn build(cluster: bool) -> Self {
        let mut registry = Registry::with_prefix("tmdb_proxy");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests by outcome (forwarded, limited, rejected_invalid, upstream_error, preflight) and TMDB code",
            requests.clone(),
        );
        let key_requests = Family::<KeyLabels, Counter>::default();
        registry.register(
            "key_requests",
            "Requests of keys given an alias in [keys.aliases], by outcome",
            key_requests.clone(),
        );
        let app_requests = Family::<AppLabels, Counter>::default();
        registry.register(
            "app_requests",
            "Requests of apps in [[clients.apps]], by outcome",
            app_requests.clone(),
        );
        let app_wait: Histograms<AppName> = Family::new_with_constructor(wait_histogram);
        registry.register(
            "app_queue_wait_seconds",
            "Time requests of each app in [[clients.apps]] waited for a token",
            app_wait.clone(),
        );
        // 1 ms to ~16 s.
        let upstream_latency = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        registry.register(
            "upstream_latency_seconds",
            "Time from sending a request upstream to its response headers",
            upstream_latency.clone(),
        );
        let upstream_429 = Counter::default();
        registry.register(
            "upstream_429",
            "429 answers received from the upstream (each pauses its key)",
            upstream_429.clone(),
        );
        let queue_waiting = Gauge::default();
        registry.register(
            "queue_waiting",
            "Requests waiting in a key's queue for a token",
            queue_waiting.clone(),
        );
        let active_buckets = Gauge::default();
        registry.register(
            "active_buckets",
            "Keys with a bucket in memory (idle ones are swept)",
            active_buckets.clone(),
        );
        let client_connections = Gauge::default();
        registry.register(
            "client_connections",
            "Open client connections",
            client_connections.clone(),
        );
        let broken_bodies = Counter::default();
        registry.register(
            "upstream_broken_bodies",
            "Upstream response bodies that broke after their headers arrived",
            broken_bodies.clone(),
        );
        let pauses = Counter::default();
        registry.register(
            "upstream_pauses",
            "Keys paused after an upstream 429 (a 429 for a key already paused is not another)",
            pauses.clone(),
        );
        let upstream_connections = Family::<StateLabels, Gauge>::default();
        registry.register(
            "upstream_connections",
            "Upstream connections by state: busy (held by a request, opening or closing) or idle",
            upstream_connections.clone(),
        );
        let upstream_max_connections = Gauge::default();
        registry.register(
            "upstream_max_connections",
            "Most upstream connections open at once (upstream.max_connections)",
            upstream_max_connections.clone(),
        );
        let key_limits = Family::<AliasLabels, Gauge>::default();
        registry.register(
            "key_limit_requests_per_second",
            "Requests per second allowed upstream for each key given an alias in [keys.aliases]",
            key_limits.clone(),
        );
        let cluster = cluster.then(|| ClusterMetrics::register(&mut registry));
        let cache = CacheMetrics::default();
        registry.register(
            "cache_requests",
            "Cacheable-or-not requests by how the cache answered: hit, miss, bypass, stale, collapsed (a miss that waited for another's fill: an upstream request saved)",
            cache.answers.clone(),
        );
        registry.register(
            "cache_evictions",
            "Entries evicted to keep the cache within cache.max_size",
            cache.evictions.clone(),
        );
        registry.register(
            "cache_entries",
            "Entries in the response cache",
            cache.entries.clone(),
        );
        registry.register(
            "cache_size_bytes",
            "Bytes held by the response cache (bodies, headers and bookkeeping)",
            cache.bytes.clone(),
        );
        Self {
            cluster,
            cache,
            registry,
            requests,
            key_requests,
            app_requests,
            app_wait,
            upstream_latency,
            upstream_429,
            queue_waiting,
            active_buckets,
            client_connections,
            broken_bodies,
            broken_seen: AtomicI64::new(0),
            pauses,
            upstream_connections,
            upstream_max_connections,
            key_limits,
        }
    }

    /// What the shared budget calls with the time of each answered Redis call (`None` without
    /// `[cluster]`).
    pub fn redis_call_observer(&self) -> Option<std::sync::Arc<dyn Fn(Duration) + Send + Sync>> {
        let histogram = self.cluster.as_ref()?.call_duration.clone();
        Some(std::sync::Arc::new(move |took: Duration| {
            histogram.observe(took.as_secs_f64());
        }))
    }

    /// Counts one answered request.
    pub fn record_request(&self, outcome: Outcome, code: Option<u16>, alias: Option<&str>) {
        self.requests
            .get_or_create(&RequestLabels {
                outcome: outcome.as_str(),
                code,
            })
            .inc();
        if let Some(alias) = alias {
            self.key_requests
                .get_or_create(&KeyLabels {
                    alias: alias.to_owned(),
                    outcome: outcome.as_str(),
                })
                .inc();
        }
    }

    /// Counts one answered request of an app, and how long it waited for its token.
    pub fn record_app(&self, app: &str, outcome: Outcome, waited: Duration) {
        self.app_requests
            .get_or_create(&AppLabels {
                app: app.to_owned(),
                outcome: outcome.as_str(),
            })
            .inc();
        self.app_wait
            .get_or_create(&AppName {
                app: app.to_owned(),
            })
            .observe(waited.as_secs_f64());
    }

    pub fn record_upstream_latency(&self, latency: Duration) {
        self.upstream_latency.observe(latency.as_secs_f64());
    }

    pub fn record_upstream_429(&self) {
        self.upstream_429.inc();
    }

    pub fn client_connected(&self) {
        self.client_connections.inc();
    }

    pub fn client_disconnected(&self) {
        self.client_connections.dec();
    }

    /// Renders the registry in `format`, after setting what is read rather than counted.
    pub fn render(&self, format: Format, readings: Readings) -> String {
        if let Some(figures) = &readings.cache {
            self.cache.set(figures);
        }
        if let (Some(metrics), Some(figures)) = (&self.cluster, &readings.cluster) {
            metrics.set(figures);
        }
        self.queue_waiting.set(gauge(readings.queue_waiting));
        self.active_buckets.set(gauge(readings.active_buckets));
        let broken = i64::try_from(readings.broken_bodies).unwrap_or(i64::MAX);
        let before = self.broken_seen.swap(broken, Ordering::Relaxed);
        if broken > before {
            self.broken_bodies
                .inc_by(u64::try_from(broken - before).unwrap_or(0));
        }
        catch_up(&self.pauses, readings.pauses);
        let connections = readings.connections;
        for (state, n) in [("busy", connections.busy), ("idle", connections.idle)] {
            self.upstream_connections
                .get_or_create(&StateLabels { state })
                .set(gauge(n));
        }
        self.upstream_max_connections.set(gauge(connections.max));
        // Aliases a reload removed go away.
        self.key_limits.clear();
        for (alias, limit) in readings.key_limits {
            self.key_limits
                .get_or_create(&AliasLabels { alias })
                .set(i64::from(limit));
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        match format {
            Format::OpenMetrics => out,
            Format::Text => classic(&out),
        }
    }
}

impl CacheMetrics {
    fn set(&self, f: &CacheFigures) {
        for (result, value) in [
            ("hit", f.hits),
            ("miss", f.misses),
            ("bypass", f.bypasses),
            ("stale", f.stale),
            ("collapsed", f.collapsed),
        ] {
            catch_up(&self.answers.get_or_create(&CacheLabels { result }), value);
        }
        catch_up(&self.evictions, f.evictions);
        self.entries
            .set(i64::try_from(f.entries).unwrap_or(i64::MAX));
        self.bytes.set(i64::try_from(f.bytes).unwrap_or(i64::MAX));
    }
}

fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Moves a counter up to `value` (the source's counters only grow).
fn catch_up(counter: &Counter, value: u64) {
    let seen = counter.get();
    if value > seen {
        counter.inc_by(value - seen);
    }
}

impl ClusterMetrics {
    fn register(registry: &mut Registry) -> Self {
        let this = Self {
            mode: Family::default(),
            calls: Family::default(),
            // 100 µs to ~100 ms.
            call_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 11)),
            transitions: Family::default(),
            tokens: Family::default(),
            decided_locally: Counter::default(),
        };
        registry.register(
            "budget_mode",
            "1 for the budget in force: shared (Redis) or local (Redis unreachable)",
            this.mode.clone(),
        );
        registry.register(
            "redis_calls",
            "Calls of the shared budget to Redis by result (ok, error, timeout)",
            this.calls.clone(),
        );
        registry.register(
            "redis_call_duration_seconds",
            "Time of answered Redis calls of the shared budget",
            this.call_duration.clone(),
        );
        registry.register(
            "budget_breaker_transitions",
            "Changes of the Redis breaker, by the mode changed to",
            this.transitions.clone(),
        );
        registry.register(
            "shared_tokens",
            "Tokens of the shared budget granted, restamped at departure, or released",
            this.tokens.clone(),
        );
        registry.register(
            "budget_decided_locally",
            "Requests decided by the local share because Redis did not answer",
            this.decided_locally.clone(),
        );
        this
    }

    /// Copies the budget's counters (they only grow) into the registry's.
    fn set(&self, f: &Figures) {
        let (shared, local) = if f.shared { (1, 0) } else { (0, 1) };
        self.mode
            .get_or_create(&ModeLabels { mode: "shared" })
            .set(shared);
        self.mode
            .get_or_create(&ModeLabels { mode: "local" })
            .set(local);
        for (result, value) in [
            ("ok", f.calls_ok),
            ("error", f.calls_failed),
            ("timeout", f.calls_timed_out),
        ] {
            catch_up(&self.calls.get_or_create(&ResultLabels { result }), value);
        }
        catch_up(
            &self.transitions.get_or_create(&ToLabels { to: "local" }),
            f.breaker_opened,
        );
        catch_up(
            &self.transitions.get_or_create(&ToLabels { to: "shared" }),
            f.breaker_closed,
        );
        for (action, value) in [
            ("granted", f.tokens_granted),
            ("restamped", f.tokens_restamped),
            ("released", f.tokens_released),
        ] {
            catch_up(&self.tokens.get_or_create(&ActionLabels { action }), value);
        }
        catch_up(&self.decided_locally, f.decided_locally);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_classic_format_names_counters_with_total_and_drops_openmetrics_lines() {
        let open = "# HELP p_requests Requests.\n# TYPE p_requests counter\n\
                    p_requests_total{a=\"b\"} 3\n\
                    # TYPE p_bare counter\np_bare_total 1\n\
                    # HELP p_wait_seconds Wait.\n# TYPE p_wait_seconds histogram\n# UNIT p_wait_seconds seconds\n\
                    p_wait_seconds_sum 0.5\np_wait_seconds_count 1\np_wait_seconds_bucket{le=\"+Inf\"} 1\n\
                    # HELP p_queue Queue.\n# TYPE p_queue gauge\np_queue 2\n\
                    # TYPE p_odd unknown\np_odd 1\n# EOF\n";
        assert_eq!(
            classic(open),
            "# HELP p_requests_total Requests.\n# TYPE p_requests_total counter\n\
             p_requests_total{a=\"b\"} 3\n\
             # TYPE p_bare_total counter\np_bare_total 1\n\
             # HELP p_wait_seconds Wait.\n# TYPE p_wait_seconds histogram\n\
             p_wait_seconds_sum 0.5\np_wait_seconds_count 1\np_wait_seconds_bucket{le=\"+Inf\"} 1\n\
             # HELP p_queue Queue.\n# TYPE p_queue gauge\np_queue 2\n\
             # TYPE p_odd untyped\np_odd 1\n"
        );
    }

    #[test]
    fn openmetrics_only_to_scrapers_that_rank_it_first() {
        use Format::{OpenMetrics, Text};
        for (accept, format) in [
            (None, Text),
            (Some("*/*"), Text),
            (Some("text/plain;version=0.0.4"), Text),
            (
                Some(
                    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
                ),
                OpenMetrics,
            ),
            (
                Some("text/plain;version=0.0.4;q=0.9,application/openmetrics-text;q=0.5"),
                Text,
            ),
            (Some("Application/OpenMetrics-Text; Q = 0"), Text),
            (
                Some("application/openmetrics-text; q=0.0, text/plain; q=0.1"),
                Text,
            ),
            (Some("application/openmetrics-text"), OpenMetrics),
        ] {
            assert_eq!(Format::negotiate(accept), format, "{accept:?}");
        }
    }

    #[test]
    fn renders_counters_and_gauges() {
        let m = Metrics::new();
        m.record_request(Outcome::Forwarded, None, Some("web"));
        m.record_request(Outcome::UpstreamError, Some(43), None);
        m.record_upstream_latency(Duration::from_millis(12));
        let readings = Readings {
            queue_waiting: 3,
            active_buckets: 7,
            broken_bodies: 1,
            ..Readings::default()
        };
        let text = m.render(Format::OpenMetrics, readings);
        assert!(
            text.contains(r#"tmdb_proxy_requests_total{outcome="forwarded",code=""} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"tmdb_proxy_requests_total{outcome="upstream_error",code="43"} 1"#)
        );
        assert!(
            text.contains(r#"tmdb_proxy_key_requests_total{alias="web",outcome="forwarded"} 1"#)
        );
        assert!(text.contains("tmdb_proxy_queue_waiting 3"));
        assert!(text.contains("tmdb_proxy_active_buckets 7"));
        assert!(text.contains("tmdb_proxy_upstream_broken_bodies_total 1"));
        assert!(text.contains("tmdb_proxy_upstream_latency_seconds_count 1"));
    }
}
