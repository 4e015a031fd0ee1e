//! The status page on the admin listener: a minute of per-second history for the proxy as a
//! whole, each key alias and each app, and the `/status.json` document the page polls.
//!
//! The history is counted as requests finish, with atomics only: each series keeps one slot per
//! second of the last minute, each slot a count stamped with the second it belongs to in one
//! word, so a slot left from an earlier minute reads as zero without any sweeper. Series are
//! named by `[keys.aliases]` and `[[clients.apps]]`, never by a raw key.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use serde::Serialize;
use tokio::time::Instant;

/// Seconds of history each series keeps.
pub const WINDOW: usize = 60;

/// The page: static, no external assets; it polls `status.json` beside it.
pub const PAGE: &str = include_str!("status.html");

/// Slots of a series: the [`WINDOW`] seconds shown, and the one still counting.
const SLOTS: usize = WINDOW + 1;

/// One second's count per slot, for the last [`WINDOW`] seconds and the current one.
#[derive(Debug)]
struct Seconds([AtomicU64; SLOTS]);

impl Default for Seconds {
    fn default() -> Self {
        Self(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

fn pack(second: u32, count: u32) -> u64 {
    (u64::from(second) << 32) | u64::from(count)
}

fn unpack(word: u64) -> (u32, u32) {
    ((word >> 32) as u32, word as u32)
}

impl Seconds {
    fn add(&self, second: u32) {
        let slot = &self.0[second as usize % SLOTS];
        // Lock-free: retried only while another thread changed the same slot meanwhile.
        let _ = slot.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |word| {
            let (stamp, count) = unpack(word);
            Some(if stamp == second {
                pack(second, count.saturating_add(1))
            } else {
                pack(second, 1)
            })
        });
    }

    /// Counts of the [`WINDOW`] whole seconds before `now`, oldest first (the second still
    /// counting is left out, so the last figure is never a partial one).
    fn minute(&self, now: u32) -> Vec<u32> {
        (1..=WINDOW as u32)
            .rev()
            .map(|ago| match now.checked_sub(ago) {
                Some(second) => {
                    let (stamp, count) =
                        unpack(self.0[second as usize % SLOTS].load(Ordering::Relaxed));
                    if stamp == second { count } else { 0 }
                }
                None => 0,
            })
            .collect()
    }
}

/// One series: what was sent upstream and refused each second, and running totals.
#[derive(Debug, Default)]
struct Series {
    sent: Seconds,
    limited: Seconds,
    requests: AtomicU64,
    sent_total: AtomicU64,
    limited_total: AtomicU64,
    upstream_429: AtomicU64,
}

/// What became of one finished request, as the history counts it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Finished {
    /// It reached the upstream (spent a token).
    pub sent: bool,
    /// The proxy refused it over a budget (429, code 25).
    pub limited: bool,
    /// The upstream answered it 429.
    pub upstream_429: bool,
}

impl Series {
    fn record(&self, second: u32, finished: Finished) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if finished.sent {
            self.sent.add(second);
            self.sent_total.fetch_add(1, Ordering::Relaxed);
        }
        if finished.limited {
            self.limited.add(second);
            self.limited_total.fetch_add(1, Ordering::Relaxed);
        }
        if finished.upstream_429 {
            self.upstream_429.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn view(&self, name: &str, kind: &'static str, now: u32) -> SeriesView {
        SeriesView {
            name: name.to_owned(),
            kind,
            limit: None,
            queued: None,
            sent: self.sent.minute(now),
            limited: self.limited.minute(now),
            requests: self.requests.load(Ordering::Relaxed),
            sent_total: self.sent_total.load(Ordering::Relaxed),
            limited_total: self.limited_total.load(Ordering::Relaxed),
            upstream_429: self.upstream_429.load(Ordering::Relaxed),
        }
    }
}

/// The history of every series, shared by all requests.
#[derive(Debug)]
pub struct History {
    epoch: Instant,
    all: Series,
    /// By alias; only names from the configuration (a reload may leave some unused).
    keys: DashMap<Arc<str>, Arc<Series>>,
    apps: DashMap<Arc<str>, Arc<Series>>,
}

impl History {
    /// An empty history whose seconds count from `epoch` (the proxy's start).
    pub fn new(epoch: Instant) -> Self {
        Self {
            epoch,
            all: Series::default(),
            keys: DashMap::new(),
            apps: DashMap::new(),
        }
    }

    fn second(&self, at: Instant) -> u32 {
        u32::try_from(at.saturating_duration_since(self.epoch).as_secs()).unwrap_or(u32::MAX)
    }

    /// Counts a request that finished `at`, in the whole and in its alias's and app's series.
    pub fn record(
        &self,
        at: Instant,
        alias: Option<&str>,
        app: Option<&Arc<str>>,
        finished: Finished,
    ) {
        let second = self.second(at);
        self.all.record(second, finished);
        if let Some(alias) = alias {
            series(&self.keys, alias).record(second, finished);
        }
        if let Some(app) = app {
            series(&self.apps, app).record(second, finished);
        }
    }

    /// The whole proxy's series at `now`.
    pub fn all(&self, now: Instant) -> SeriesView {
        self.all.view("all requests", "all", self.second(now))
    }

    /// The series of key alias `alias` at `now` (zeros if it has had no request).
    pub fn key(&self, alias: &str, now: Instant) -> SeriesView {
        view(&self.keys, alias, "key", self.second(now))
    }

    /// The series of app `name` at `now` (zeros if it has had no request).
    pub fn app(&self, name: &str, now: Instant) -> SeriesView {
        view(&self.apps, name, "app", self.second(now))
    }

    /// Time since `epoch`.
    pub fn uptime(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.epoch)
    }
}

fn series(map: &DashMap<Arc<str>, Arc<Series>>, name: &str) -> Arc<Series> {
    if let Some(found) = map.get(name) {
        return found.clone();
    }
    map.entry(Arc::from(name)).or_default().clone()
}

fn view(
    map: &DashMap<Arc<str>, Arc<Series>>,
    name: &str,
    kind: &'static str,
    now: u32,
) -> SeriesView {
    match map.get(name).map(|s| s.clone()) {
        Some(series) => series.view(name, kind, now),
        None => Series::default().view(name, kind, now),
    }
}

/// One series as `/status.json` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SeriesView {
    pub name: String,
    /// `all`, `key` (an alias) or `app`.
    pub kind: &'static str,
    /// Requests per second allowed upstream, where one applies.
    pub limit: Option<u32>,
    /// Requests waiting for a token now, where known.
    pub queued: Option<usize>,
    /// Sent upstream in each of the 60 whole seconds before now, oldest first.
    pub sent: Vec<u32>,
    /// Refused over a budget (429, code 25), per second likewise.
    pub limited: Vec<u32>,
    /// Since start: requests answered, sent upstream, refused (429s given), and upstream 429s.
    pub requests: u64,
    pub sent_total: u64,
    pub limited_total: u64,
    pub upstream_429: u64,
}

/// The document `GET /status.json` answers.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub version: &'static str,
    pub uptime_seconds: u64,
    pub ready: bool,
    pub all: SeriesView,
    pub keys: Vec<SeriesView>,
    pub apps: Vec<SeriesView>,
    pub queue_waiting: usize,
    pub upstream: UpstreamView,
    pub cache: Option<CacheView>,
    pub cluster: Option<ClusterView>,
}

/// Upstream connections and refusals.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct UpstreamView {
    /// Connections held by requests (or being opened).
    pub busy: usize,
    /// Open and waiting for a request.
    pub idle: usize,
    /// `upstream.max_connections`.
    pub max: usize,
    /// Keys paused after an upstream 429, since start.
    pub pauses: u64,
}

/// The response cache.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CacheView {
    pub hits: u64,
    pub misses: u64,
    /// Hits over hits and misses; `None` before either.
    pub hit_ratio: Option<f64>,
    pub entries: u64,
    pub bytes: u64,
    pub max_bytes: u64,
}

/// The shared budget.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ClusterView {
    /// `shared` (on Redis) or `local` (Redis does not answer).
    pub mode: &'static str,
    pub redis_calls_ok: u64,
    pub redis_calls_failed: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_minute_of_whole_seconds_and_older_ones_read_as_zero() {
        let history = History::new(Instant::now());
        let sent = Finished {
            sent: true,
            ..Finished::default()
        };
        let limited = Finished {
            limited: true,
            ..Finished::default()
        };
        let app: Arc<str> = Arc::from("scraper");
        let second = Duration::from_secs(1);
        for _ in 0..3 {
            history.record(Instant::now(), Some("web"), None, sent);
        }
        // The second still counting is not shown.
        assert_eq!(history.all(Instant::now()).sent.iter().sum::<u32>(), 0);
        tokio::time::advance(second).await;
        history.record(Instant::now(), Some("web"), Some(&app), limited);
        tokio::time::advance(second).await;
        let all = history.all(Instant::now());
        assert_eq!(all.sent.len(), WINDOW);
        assert_eq!(&all.sent[WINDOW - 2..], &[3, 0]);
        assert_eq!(&all.limited[WINDOW - 2..], &[0, 1]);
        assert_eq!((all.requests, all.sent_total, all.limited_total), (4, 3, 1));
        assert_eq!(history.key("web", Instant::now()).requests, 4);
        assert_eq!(history.app("scraper", Instant::now()).limited_total, 1);
        assert_eq!(history.key("other", Instant::now()).requests, 0);

        // At second 61, second 1 is the oldest shown, though second 61 already counts in the
        // slot next to it; second 0's slot is reused by second 61, so its old count does not
        // show.
        tokio::time::advance(59 * second).await;
        history.record(Instant::now(), None, None, sent);
        let all = history.all(Instant::now());
        assert_eq!(all.sent.iter().sum::<u32>(), 0, "{:?}", all.sent);
        assert_eq!(all.limited[0], 1, "second 1 is still within the minute");
        tokio::time::advance(second).await;
        let all = history.all(Instant::now());
        assert_eq!(all.sent.iter().sum::<u32>(), 1, "{:?}", all.sent);
        assert_eq!(all.sent[WINDOW - 1], 1);
        assert_eq!(
            all.limited.iter().sum::<u32>(),
            0,
            "second 1 left the minute"
        );
        assert_eq!(all.requests, 5);
    }
}
