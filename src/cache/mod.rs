//! The response cache: answers repeats of public TMDB data from memory, merges identical
//! requests in flight, and keeps recent copies to answer with when TMDB fails or a key is over
//! its limit. Never shares one user's data with another: what is cacheable is decided by
//! [`rules`], not by TMDB's headers.
//!
//! Entries live in a `moka` cache bounded by bytes (a weigher over each entry's size). Freshness
//! is kept on the proxy's own clock (tokio's, paused in tests), not moka's: each entry knows
//! until when it is fresh and until when it may still answer as stale.
//!
//! A miss of a known key joins the key's [`Flight`] or leads one: the leader's request is sent in
//! a task of its own (a client that goes away leaves only itself), its answer read whole (up to
//! `max_object_size`) while the leader's client gets it as it arrives, stored if storable (once,
//! compressed), and handed whole to every waiter.

pub mod rules;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::CacheConfig;

pub use rules::Bypass;

/// Bytes an entry costs besides its body (key, headers, bookkeeping), for the weigher.
const ENTRY_OVERHEAD: u32 = 512;

/// One stored answer.
#[derive(Debug)]
pub struct Entry {
    pub status: StatusCode,
    /// The upstream's headers, hop-by-hop and per-answer ones removed.
    pub headers: HeaderMap,
    pub body: Bytes,
    /// When it was stored, and how old TMDB said it already was then.
    pub stored_at: Instant,
    pub upstream_age: Duration,
    pub fresh_until: Instant,
    /// It may answer as stale (TMDB failing, the key over its limit) until this.
    pub stale_until: Instant,
}

impl Entry {
    /// `Age` at `now`, in whole seconds.
    pub fn age(&self, now: Instant) -> u64 {
        (self.upstream_age)
            .saturating_add(now.saturating_duration_since(self.stored_at))
            .as_secs()
    }

    pub fn is_fresh(&self, now: Instant) -> bool {
        now < self.fresh_until
    }

    fn weight(&self) -> u32 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len())
            .sum();
        u32::try_from(self.body.len() + headers)
            .unwrap_or(u32::MAX)
            .saturating_add(ENTRY_OVERHEAD)
    }
}

/// What a fill brought back, for the leader and every waiter alike.
#[derive(Debug, Clone)]
pub struct Filled {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Whether it was stored.
    pub stored: bool,
    /// What the fill met upstream (whether it answered, its 429, its latency) and the key's
    /// standing after it, for the leader's answer.
    pub exchanged: crate::proxy::ctx::Exchanged,
    /// The same for every key, so waiters of other keys may have it (TMDB's data and its
    /// failures; not a 401, 403 or 429 about the leader's key, nor a 304 or 206).
    pub shareable: bool,
}

impl Filled {
    /// An upstream answer read whole, before it is judged or stored.
    pub fn read(status: StatusCode, headers: HeaderMap, body: Bytes) -> Self {
        Self {
            status,
            headers,
            body,
            stored: false,
            exchanged: crate::proxy::ctx::Exchanged {
                answered: true,
                ..Default::default()
            },
            shareable: false,
        }
    }

    /// A failure a stale copy may answer for instead: TMDB failing (5xx, no answer), TMDB's or
    /// the proxy's 429.
    pub fn is_failure(&self) -> bool {
        self.status.is_server_error() || self.status == StatusCode::TOO_MANY_REQUESTS
    }
}

/// A fill in progress: its result, once there is one. `None` in the channel until then; a
/// closed channel without a result means the fill was abandoned and each waiter goes itself.
pub type FlightResult = watch::Receiver<Option<Arc<Filled>>>;

/// The right to fill one key: dropping it without [`Leader::publish`] abandons the flight.
#[derive(Debug)]
pub struct Leader {
    cache: Arc<Cache>,
    key: String,
    tx: watch::Sender<Option<Arc<Filled>>>,
}

impl Leader {
    /// Hands the result to every waiter (the leader's client included) and ends the flight.
    pub fn publish(self, filled: Filled) {
        let _ = self.tx.send(Some(Arc::new(filled)));
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        let mut flights = lock(&self.cache.flights);
        if flights
            .get(&self.key)
            .is_some_and(|rx| rx.same_channel(&self.tx.subscribe()))
        {
            flights.remove(&self.key);
        }
    }
}

/// How a miss goes upstream.
#[derive(Debug)]
pub enum Join {
    /// This request fills the key; waiters follow its flight.
    Lead(Leader, FlightResult),
    /// Another request is filling it.
    Wait(FlightResult),
}

/// Counters, for metrics.
#[derive(Debug, Default)]
pub struct Stats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub bypasses: AtomicU64,
    pub stale: AtomicU64,
    pub collapsed: AtomicU64,
    pub evictions: Arc<AtomicU64>,
}

/// The response cache.
#[derive(Debug)]
pub struct Cache {
    cfg: CacheConfig,
    entries: moka::sync::Cache<String, Arc<Entry>>,
    flights: Mutex<HashMap<String, FlightResult>>,
    pub stats: Stats,
}

impl Cache {
    pub fn new(cfg: &CacheConfig) -> Arc<Self> {
        let evictions = Arc::new(AtomicU64::new(0));
        let counted = evictions.clone();
        let entries = moka::sync::Cache::builder()
            .max_capacity(cfg.max_size)
            .weigher(|_key: &String, entry: &Arc<Entry>| entry.weight())
            // An upper bound on the real clock; freshness itself is judged on the proxy's.
            .time_to_live(cfg.max_ttl + cfg.stale_if_error + Duration::from_secs(60))
            .eviction_listener(move |_key, _entry, cause| {
                if cause == moka::notification::RemovalCause::Size {
                    counted.fetch_add(1, Ordering::Relaxed);
                }
            })
            .build();
        Arc::new(Self {
            cfg: cfg.clone(),
            entries,
            flights: Mutex::new(HashMap::new()),
            stats: Stats {
                evictions,
                ..Stats::default()
            },
        })
    }

    pub fn config(&self) -> &CacheConfig {
        &self.cfg
    }

    /// The entry for `key`, if it may still answer at `now` (fresh or stale).
    pub fn get(&self, key: &str, now: Instant) -> Option<Arc<Entry>> {
        let entry = self.entries.get(key)?;
        if now < entry.stale_until {
            Some(entry)
        } else {
            self.entries.invalidate(key);
            None
        }
    }

    /// Joins the flight filling `key`, or starts one.
    pub fn join(self: &Arc<Self>, key: &str) -> Join {
        let mut flights = lock(&self.flights);
        if let Some(rx) = flights.get(key)
            && rx.has_changed().is_ok()
        {
            self.stats.collapsed.fetch_add(1, Ordering::Relaxed);
            return Join::Wait(rx.clone());
        }
        let (tx, rx) = watch::channel(None);
        flights.insert(key.to_owned(), rx.clone());
        drop(flights);
        let leader = Leader {
            cache: self.clone(),
            key: key.to_owned(),
            tx,
        };
        Join::Lead(leader, rx)
    }

    /// Stores an answer if it may be stored; returns whether it was.
    pub fn store(
        &self,
        key: &str,
        path: &str,
        status: StatusCode,
        headers: &HeaderMap,
        body: &Bytes,
        now: Instant,
    ) -> bool {
        if body.len() > self.cfg.max_object_size {
            return false;
        }
        let Some(fresh) = rules::freshness(status, headers, body, path, &self.cfg) else {
            return false;
        };
        let upstream_age = headers
            .get(http::header::AGE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map_or(Duration::ZERO, Duration::from_secs)
            .min(self.cfg.max_ttl);
        let mut headers = stored_headers(headers);
        let body = compressed(&mut headers, body).unwrap_or_else(|| body.clone());
        let entry = Entry {
            status,
            headers,
            body,
            stored_at: now,
            upstream_age,
            fresh_until: now + fresh,
            stale_until: now + fresh + self.cfg.stale_if_error,
        };
        self.entries.insert(key.to_owned(), Arc::new(entry));
        true
    }

    /// Removes every entry whose key starts with `prefix` (all with `""`); returns how many.
    pub fn purge(&self, prefix: &str) -> u64 {
        self.entries.run_pending_tasks();
        let keys: Vec<Arc<String>> = self
            .entries
            .iter()
            .filter(|(key, _)| key.starts_with(prefix))
            .map(|(key, _)| key)
            .collect();
        for key in &keys {
            self.entries.invalidate(key.as_str());
        }
        self.entries.run_pending_tasks();
        keys.len() as u64
    }

    /// The counters and size, for metrics.
    pub fn figures(&self) -> crate::metrics::CacheFigures {
        let (entries, bytes) = self.size();
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let s = &self.stats;
        crate::metrics::CacheFigures {
            hits: get(&s.hits),
            misses: get(&s.misses),
            bypasses: get(&s.bypasses),
            stale: get(&s.stale),
            collapsed: get(&s.collapsed),
            evictions: get(&s.evictions),
            entries,
            bytes,
        }
    }

    /// Entries and their bytes, for metrics.
    pub fn size(&self) -> (u64, u64) {
        self.entries.run_pending_tasks();
        (self.entries.entry_count(), self.entries.weighted_size())
    }
}

/// Bodies shorter than this are stored as they came: gzip would save little, and a client that
/// does not take gzip would pay a decode on every hit.
pub const COMPRESS_FROM: usize = 1024;

/// `body` gzip-compressed for storing, with `headers` made to say so, if it came uncompressed,
/// is at least [`COMPRESS_FROM`] long and shrinks by a tenth or more. TMDB's edge compresses
/// for clients that ask, so most fills arrive compressed already; this stores the others once,
/// compressed too. A strong `ETag` becomes weak: it named the uncompressed bytes.
fn compressed(headers: &mut HeaderMap, body: &Bytes) -> Option<Bytes> {
    use std::io::Write;
    if body.len() < COMPRESS_FROM || headers.contains_key(http::header::CONTENT_ENCODING) {
        return None;
    }
    let mut gz = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4),
        flate2::Compression::fast(),
    );
    gz.write_all(body).ok()?;
    let packed = gz.finish().ok()?;
    if packed.len() > body.len() / 10 * 9 {
        return None;
    }
    headers.insert(
        http::header::CONTENT_ENCODING,
        HeaderValue::from_static("gzip"),
    );
    headers.remove(http::header::CONTENT_LENGTH);
    if let Some(etag) = headers.get(http::header::ETAG)
        && !etag.as_bytes().starts_with(b"W/")
    {
        let mut weak = b"W/".to_vec();
        weak.extend_from_slice(etag.as_bytes());
        if let Ok(weak) = HeaderValue::from_bytes(&weak) {
            headers.insert(http::header::ETAG, weak);
        }
    }
    Some(Bytes::from(packed))
}

/// The headers kept with an entry: the upstream's, less those that belong to one answer
/// (hop-by-hop, cookies, TMDB's CDN `X-Cache` and `Age`, rate-limit fields, the request id).
pub fn stored_headers(headers: &HeaderMap) -> HeaderMap {
    const DROPPED: &[&str] = &[
        "connection",
        "keep-alive",
        "transfer-encoding",
        "set-cookie",
        "age",
        "x-cache",
        "via",
        "date",
        "x-request-id",
        "ratelimit",
        "ratelimit-policy",
        "retry-after",
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
        "access-control-allow-origin",
        "access-control-expose-headers",
        "vary",
        // They may repeat the filling request's query, api_key included.
        "location",
        "content-location",
    ];
    let mut kept = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if !DROPPED.contains(&name.as_str()) {
            kept.append(name.clone(), value.clone());
        }
    }
    kept
}

/// The `X-Cache` and `Cache-Status` (RFC 9211) of an answer.
pub fn status_headers(
    out: &mut HeaderMap,
    x_cache: &'static str,
    cache_status: std::borrow::Cow<'static, str>,
) {
    out.insert("x-cache", HeaderValue::from_static(x_cache));
    let value = match cache_status {
        std::borrow::Cow::Borrowed(fixed) => Ok(HeaderValue::from_static(fixed)),
        std::borrow::Cow::Owned(text) => HeaderValue::try_from(text),
    };
    if let Ok(value) = value {
        out.insert("cache-status", value);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
