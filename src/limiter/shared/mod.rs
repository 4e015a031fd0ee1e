//! The shared budget: one budget for every replica, kept in Redis.
//!
//! The bucket math is the local limiter's, run by one Lua script on Redis's clock (see
//! `budget.lua` and [`script`] for the key layout), so N replicas together never send more than
//! N per window for a key. The hot path:
//! - acquires of one key go through its *lane*: at most one call per key is in flight from this
//!   replica, and requests arriving meanwhile are charged together by the next call;
//! - a refusal marks the key dry here until its `retry_after`, and requests that cannot wait that
//!   long are refused without asking Redis;
//! - a grant that leaves within the tolerance needs no second call; a later one is restamped.
//!
//! When Redis fails or is slow, no request waits on it longer than `call_timeout`: the request is
//! decided by the local share (a [`LocalBudget`] allowing `floor(N / expected_replicas)`), which
//! admits nothing until a window after the failures began, so the admissions other replicas made
//! through Redis have expired. After [`FAILURES_TO_OPEN`](breaker::FAILURES_TO_OPEN) failures in a
//! row the breaker opens and Redis is not asked at all; a probe closes it once Redis answers,
//! after writing the local share's admissions of the last window into Redis, so the shared log
//! counts them.

mod breaker;
mod link;
mod script;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use dashmap::DashMap;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::budget::{Budget, Grant, Pending, Policy, RateState, Reason, Refusal, Stamp};
use super::key::Key;
use super::local::LocalBudget;
use super::{Nanos, Quota};
use crate::config::{ClusterConfig, RedisStore};
use breaker::{Breaker, Transition};
use link::Link;
pub use link::LinkError;
use script::{Answer, Ask, Confirmed, GlobalSlot, Layout, Micros, Move, Resumed};

/// Most tokens one call takes for a key.
const MAX_BATCH: usize = 64;

/// How often an open breaker probes Redis, and idle lanes are dropped.
const PROBE_EVERY: Duration = Duration::from_millis(250);

/// A stamp this close ahead of Redis's now counts as the present (as `CLOCK_SKEW`), in µs.
const SKEW: Micros = 1_000;

/// Which budget is in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every replica charges one budget in Redis.
    Shared,
    /// Redis is unreachable: this replica keeps its local share.
    Local,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Shared => "shared",
            Self::Local => "local",
        }
    }
}

/// Counters of the shared budget, for metrics.
#[derive(Debug, Default)]
struct Stats {
    calls_ok: AtomicU64,
    calls_failed: AtomicU64,
    calls_timed_out: AtomicU64,
    breaker_opened: AtomicU64,
    breaker_closed: AtomicU64,
    tokens_granted: AtomicU64,
    tokens_restamped: AtomicU64,
    tokens_released: AtomicU64,
    /// Requests decided by the local share because Redis did not answer.
    decided_locally: AtomicU64,
}

/// The shared budget's counters and mode, as a metrics scrape reads them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Figures {
    pub shared: bool,
    pub calls_ok: u64,
    pub calls_failed: u64,
    pub calls_timed_out: u64,
    pub breaker_opened: u64,
    pub breaker_closed: u64,
    pub tokens_granted: u64,
    pub tokens_restamped: u64,
    pub tokens_released: u64,
    pub decided_locally: u64,
}

/// The budget shared by every replica through Redis.
#[derive(Debug, Clone)]
pub struct SharedBudget {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    link: Link,
    layout: Layout,
    policy: ArcSwap<Policy>,
    /// The local share, used while Redis does not answer.
    fallback: LocalBudget,
    replicas: u32,
    breaker: Mutex<Breaker>,
    /// Redis answers again: the budget turns shared at this time (see `probe`).
    returning_until: Mutex<Option<Instant>>,
    /// Mirrors the breaker, read on every request without its lock.
    open: AtomicBool,
    /// Redis has answered at least once.
    proven: AtomicBool,
    lanes: DashMap<Key, Arc<Lane>, foldhash::fast::RandomState>,
    /// Names this replica's stamps in the logs.
    replica: String,
    seq: AtomicU64,
    stats: Stats,
    /// Told the time of each answered call (the metrics' histogram).
    observe: Option<Observed>,
}

struct Observed(Observer);

impl std::fmt::Debug for Observed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Observed")
    }
}

/// What is told the time of each answered Redis call.
pub type Observer = Arc<dyn Fn(Duration) + Send + Sync>;

/// One key's queue of acquires for Redis.
#[derive(Debug, Default)]
struct Lane {
    state: Mutex<LaneState>,
}

#[derive(Debug, Default)]
struct LaneState {
    /// A call for this key is in flight (its task serves everyone waiting).
    busy: bool,
    waiting: Vec<Waiter>,
    /// No token before this, as Redis last said (a refusal or a pause).
    dry_until: Option<Instant>,
    /// Until when an upstream 429 seen here paused the key (refusals then say so).
    paused_until: Option<Instant>,
    /// The key's standing after its last grant, for `peek`.
    last: Option<(Instant, RateState)>,
    used: Option<Instant>,
}

#[derive(Debug)]
struct Waiter {
    max_wait: Duration,
    reply: oneshot::Sender<Result<Reply, LinkError>>,
}

/// Redis's answer for one token, with both clocks at the moment it came back.
#[derive(Debug)]
struct Reply {
    redis_now: Micros,
    local_now: Instant,
    ask: Ask,
    answer: Answer,
}

// === impl SharedBudget ===

impl SharedBudget {
    /// A shared budget on `store` under `policy`, not yet connected: the first calls connect,
    /// and requests are served on the local share until Redis answers.
    pub fn new(
        cfg: &ClusterConfig,
        store: &RedisStore,
        policy: Policy,
        observe: Option<Observer>,
    ) -> Result<Self, LinkError> {
        let replicas = cfg.expected_replicas.get();
        let inner = Arc::new(Inner {
            link: Link::new(cfg, store)?,
            layout: Layout::new(&cfg.namespace, policy.global.is_some()),
            fallback: LocalBudget::new(share(&policy, replicas)),
            policy: ArcSwap::from_pointee(policy),
            replicas,
            breaker: Mutex::new(Breaker::new()),
            returning_until: Mutex::new(None),
            open: AtomicBool::new(false),
            proven: AtomicBool::new(false),
            lanes: DashMap::default(),
            replica: replica_id(),
            seq: AtomicU64::new(0),
            stats: Stats::default(),
            observe: observe.map(Observed),
        });
        spawn_upkeep(Arc::downgrade(&inner));
        Ok(Self { inner })
    }

    /// Which budget is in force now.
    pub fn mode(&self) -> Mode {
        self.inner.mode()
    }

    /// The counters, as metrics show them.
    pub fn figures(&self) -> Figures {
        let s = &self.inner.stats;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Figures {
            shared: self.mode() == Mode::Shared,
            calls_ok: get(&s.calls_ok),
            calls_failed: get(&s.calls_failed),
            calls_timed_out: get(&s.calls_timed_out),
            breaker_opened: get(&s.breaker_opened),
            breaker_closed: get(&s.breaker_closed),
            tokens_granted: get(&s.tokens_granted),
            tokens_restamped: get(&s.tokens_restamped),
            tokens_released: get(&s.tokens_released),
            decided_locally: get(&s.decided_locally),
        }
    }
}

/// For `tmdb-proxy check`: connects to `store` (authenticating as its URL says) and runs the
/// budget script once (loading it), waiting up to `within`.
pub async fn check(
    cfg: &ClusterConfig,
    store: &RedisStore,
    within: Duration,
) -> Result<(), LinkError> {
    let cfg = ClusterConfig {
        call_timeout: within,
        ..cfg.clone()
    };
    let link = Link::new(&cfg, store)?;
    let layout = Layout::new(&cfg.namespace, false);
    let inv = script::ping(&layout, "check");
    let mut answer = link.invoke(&inv).await;
    // A cluster connection is made in the background on first use.
    let deadline = Instant::now() + within;
    while matches!(answer, Err(LinkError::NotConnected)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        answer = link.invoke(&inv).await;
    }
    answer.map(drop)
}

impl Budget for SharedBudget {
    fn acquire(
        &self,
        key: Key,
        now: Instant,
        max_wait: Duration,
    ) -> Pending<'_, Result<Grant, Refusal>> {
        if self.inner.open.load(Ordering::Relaxed) {
            return Pending::ready(self.inner.local_acquire(key, now, max_wait));
        }
        let inner = self.inner.clone();
        Pending::later(async move { inner.acquire(key, now, max_wait).await })
    }

    fn resume<'a>(
        &'a self,
        grant: &'a mut Grant,
        now: Instant,
        max_wait: Duration,
    ) -> Pending<'a, Result<(), Refusal>> {
        if !grant.shared {
            return self.inner.fallback.resume(grant, now, max_wait);
        }
        Pending::later(self.inner.resume(grant, now, max_wait))
    }

    fn confirm<'a>(
        &'a self,
        grant: &'a mut Grant,
        now: Instant,
    ) -> Pending<'a, Result<(), Refusal>> {
        if !grant.shared {
            return self.inner.fallback.confirm(grant, now);
        }
        // Each stamp must leave within the tolerance of its own time: `at` is the later one's
        // (a global slot may come after the key's token), so stamps further apart than the
        // tolerance go to Redis too.
        let tolerance = self.inner.policy.load().tolerance;
        let times = grant.stamps.iter().flatten().map(|s| s.at / 1000);
        let spread = times.clone().max().unwrap_or(0) - times.min().unwrap_or(0);
        if now.saturating_duration_since(grant.at) <= tolerance
            && Duration::from_micros(spread) <= tolerance
        {
            return Pending::ready(Ok(()));
        }
        Pending::later(self.inner.confirm(grant))
    }

    fn release(&self, grant: &Grant) {
        if !grant.shared {
            return self.inner.fallback.release(grant);
        }
        let stamps: Vec<(Key, Micros, u64)> = (grant.stamps.iter().flatten())
            .map(|s| (s.key, (s.at / 1000) as Micros, s.at % 1000))
            .collect();
        // A token came back: the key may have one free before Redis last said.
        if let Some(lane) = self.inner.lanes.get(&grant.key) {
            lock(&lane.state).dry_until = None;
        }
        self.inner.release_stamps(stamps);
    }

    fn pause(&self, key: Key, now: Instant, wait: Duration) -> bool {
        let lane = self.inner.lane(key);
        {
            let mut state = lock(&lane.state);
            let until = now + wait;
            state.dry_until = Some(state.dry_until.map_or(until, |d| d.max(until)));
            state.paused_until = Some(state.paused_until.map_or(until, |d| d.max(until)));
        }
        let first = self.inner.fallback.pause(key, now, wait);
        if !self.inner.open.load(Ordering::Relaxed) {
            let inner = self.inner.clone();
            let window = micros(window_of(&inner.policy.load().default));
            tokio::spawn(async move {
                let inv = script::pause(&inner.layout, &inner.replica, key, micros(wait), window);
                let _ = inner.call(&inv, Ok).await;
            });
        }
        first
    }

    fn peek(&self, key: Key, now: Instant) -> RateState {
        if self.inner.open.load(Ordering::Relaxed) {
            return self.inner.fallback.peek(key, now);
        }
        let quota = self.inner.policy.load().quota_for(key);
        let fresh =
            |(at, _): &(Instant, RateState)| now.saturating_duration_since(*at) < window_of(&quota);
        let last = self
            .inner
            .lanes
            .get(&key)
            .and_then(|lane| lock(&lane.state).last.filter(fresh));
        last.map_or(
            RateState {
                limit: quota.capacity,
                remaining: quota.capacity,
                reset_after: Duration::ZERO,
            },
            |(_, rate)| rate,
        )
    }

    fn set_policy(&self, mut policy: Policy) {
        // The key layout follows whether a ceiling was set at start (a key and the ceiling must
        // share a slot): turning it on or off takes a restart (`Config::restart_required`).
        let before = self.inner.policy.load().global;
        if self.inner.layout.one_slot() != policy.global.is_some() {
            policy.global = before;
        }
        self.inner
            .fallback
            .set_policy(share(&policy, self.inner.replicas));
        self.inner.policy.store(Arc::new(policy));
        // Limits changed: what Redis said about keys being dry no longer holds.
        for lane in self.inner.lanes.iter() {
            lock(&lane.state).dry_until = None;
        }
    }

    fn tracked_keys(&self) -> usize {
        self.inner
            .lanes
            .len()
            .max(self.inner.fallback.tracked_keys())
    }

    fn shared(&self) -> Option<&SharedBudget> {
        Some(self)
    }
}

// === impl Inner ===

impl Inner {
    /// Local while the breaker is open, and while Redis's last answer was a failure.
    fn mode(&self) -> Mode {
        if self.open.load(Ordering::Relaxed) || lock(&self.breaker).is_failing() {
            Mode::Local
        } else {
            Mode::Shared
        }
    }

    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    fn lane(&self, key: Key) -> Arc<Lane> {
        if let Some(lane) = self.lanes.get(&key) {
            return lane.clone();
        }
        self.lanes.entry(key).or_default().clone()
    }

    /// One call, counted, with the breaker told how it went.
    async fn call<T>(
        &self,
        inv: &redis::ScriptInvocation<'_>,
        read: impl FnOnce(redis::Value) -> Result<T, LinkError>,
    ) -> Result<T, LinkError> {
        let started = Instant::now();
        // A reply the budget cannot read counts as a failure too.
        let answer = self.link.invoke(inv).await.and_then(read);
        let now = Instant::now();
        let transition = {
            let mut breaker = lock(&self.breaker);
            match &answer {
                Ok(_) => {
                    // Only the probe closes an open breaker (it syncs the local share first).
                    if breaker.is_open() {
                        Transition::None
                    } else {
                        breaker.success()
                    }
                }
                Err(_) => breaker.failure(now),
            }
        };
        match &answer {
            Ok(_) => {
                self.stats.calls_ok.fetch_add(1, Ordering::Relaxed);
                if let Some(Observed(observe)) = &self.observe {
                    observe(now.saturating_duration_since(started));
                }
            }
            Err(LinkError::Timeout(_)) => {
                self.stats.calls_timed_out.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                self.stats.calls_failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        if transition == Transition::Opened {
            self.open.store(true, Ordering::Relaxed);
            self.stats.breaker_opened.fetch_add(1, Ordering::Relaxed);
            if let Err(error) = &answer {
                tracing::warn!(
                    %error,
                    share = self.fallback.policy().default.capacity,
                    "Redis does not answer: the budget is local (each replica keeps its share)"
                );
            }
        }
        answer
    }

    async fn acquire(
        self: Arc<Self>,
        key: Key,
        now: Instant,
        max_wait: Duration,
    ) -> Result<Grant, Refusal> {
        let lane = self.lane(key);
        let reply = {
            let mut state = lock(&lane.state);
            state.used = Some(now);
            if let Some(dry) = state.dry_until
                && dry > now + max_wait
            {
                let limit = self.policy.load().quota_for(key).capacity;
                let reason = match state.paused_until {
                    Some(until) if until > now => Reason::Paused,
                    _ => Reason::KeyOverLimit,
                };
                return Err(Refusal::new(reason, limit, limit, dry - now));
            }
            let (tx, rx) = oneshot::channel();
            state.waiting.push(Waiter {
                max_wait,
                reply: tx,
            });
            if !std::mem::replace(&mut state.busy, true) {
                tokio::spawn(drive(self.clone(), key, lane.clone()));
            }
            rx
        };
        match reply.await {
            Ok(Ok(reply)) => self.grant_from(key, &lane, reply, now),
            // Redis did not answer: the local share decides, without waiting any longer.
            _ => self.local_acquire(key, Instant::now(), max_wait.saturating_sub(now.elapsed())),
        }
    }

    /// Turns Redis's answer into a grant or a refusal, on the local clock.
    /// `asked` is when the request asked: a grant due at once is due then (so the admission step
    /// sends it without a second call), and its departure is judged from then, which covers the
    /// call's way there and back.
    fn grant_from(
        &self,
        key: Key,
        lane: &Lane,
        reply: Reply,
        asked: Instant,
    ) -> Result<Grant, Refusal> {
        let policy = self.policy.load();
        let quota = policy.quota_for(key);
        let to_local = |t: Micros| reply.local_now + from_micros(t - reply.redis_now);
        let ahead = |t: Micros| t - reply.redis_now > SKEW;
        match reply.answer {
            Answer::Admitted {
                at,
                remaining,
                next_free,
                global,
                key_seq,
                global_seq,
            } => {
                let rate = RateState {
                    limit: quota.capacity,
                    remaining,
                    reset_after: from_micros(next_free - at),
                };
                let mut grant = Grant {
                    key,
                    at: if ahead(at) { to_local(at) } else { asked },
                    pending: false,
                    queue_limit: quota.capacity,
                    rate,
                    stamps: [Some(stamp(key, quota, at, key_seq)), None],
                    shared: true,
                };
                match (global, policy.global) {
                    (Some(GlobalSlot::At(g)), Some(gq)) => {
                        grant.stamps[1] = Some(stamp(Key::GLOBAL, gq, g, global_seq));
                        if ahead(g) {
                            grant.at = grant.at.max(to_local(g));
                            grant.queue_limit = gq.capacity;
                        }
                    }
                    (Some(GlobalSlot::AtTurn), Some(_)) => grant.pending = true,
                    _ => {}
                }
                lock(&lane.state).last = Some((reply.local_now, rate));
                self.stats.tokens_granted.fetch_add(1, Ordering::Relaxed);
                Ok(grant)
            }
            Answer::KeyDenied {
                next_free,
                in_window,
                paused,
            } => {
                let wait = from_micros(next_free - reply.redis_now);
                let reason = if paused {
                    Reason::Paused
                } else {
                    Reason::KeyOverLimit
                };
                Err(Refusal::new(reason, quota.capacity, in_window, wait))
            }
            Answer::GlobalDenied {
                next_free,
                in_window,
            } => {
                let limit = policy.global.map_or(quota.capacity, |g| g.capacity);
                let wait = from_micros(next_free - reply.redis_now);
                Err(Refusal::new(
                    Reason::GlobalOverLimit,
                    limit,
                    in_window,
                    wait,
                ))
            }
        }
    }

    /// The local share's decision. While Redis has been failing for less than a window, it
    /// admits nothing before that window is out (as if the key were paused until then).
    fn local_acquire(
        self: &Arc<Self>,
        key: Key,
        now: Instant,
        max_wait: Duration,
    ) -> Result<Grant, Refusal> {
        self.stats.decided_locally.fetch_add(1, Ordering::Relaxed);
        let window = window_of(&self.policy.load().default);
        let from = lock(&self.breaker).local_from(window);
        if let Some(from) = from
            && from > now
        {
            self.fallback.pause(key, now, from - now);
            self.fallback.pause(Key::GLOBAL, now, from - now);
        }
        let grant = self.fallback.try_acquire(key, now, max_wait)?;
        self.record_returning(&grant, now);
        Ok(grant)
    }

    /// A queued grant's turn has come at `now`: checks the key was not paused meanwhile and
    /// takes the global token it still lacks.
    async fn resume(
        &self,
        grant: &mut Grant,
        now: Instant,
        max_wait: Duration,
    ) -> Result<(), Refusal> {
        let policy = self.policy.load();
        let global = policy.global.filter(|_| grant.pending);
        let seq = self.next_seq();
        let inv = script::resume(
            &self.layout,
            &self.replica,
            grant.key,
            global,
            micros(max_wait),
            seq,
        );
        let answer = self.call(&inv, script::resume_reply).await;
        let local_now = Instant::now();
        let limit = grant.rate.limit;
        // Queue again: the turn is given back and asked for anew.
        let again = Refusal::new(Reason::Paused, limit, 0, Duration::ZERO);
        match answer {
            Ok((_, Resumed::Paused)) => Err(again),
            Ok((redis_now, Resumed::Go(g))) => {
                if let (Some((g, gseq)), Some(gq)) = (g, global) {
                    grant.stamps[1] = Some(stamp(Key::GLOBAL, gq, g, gseq));
                    if g - redis_now > SKEW {
                        grant.at = local_now + from_micros(g - redis_now);
                        grant.queue_limit = gq.capacity;
                    } else {
                        // Due now, as the admission step asked at `now`.
                        grant.at = now;
                    }
                }
                grant.pending = false;
                Ok(())
            }
            Ok((
                redis_now,
                Resumed::GlobalDenied {
                    next_free,
                    in_window,
                },
            )) => {
                let limit = global.map_or(limit, |g| g.capacity);
                let wait = from_micros(next_free - redis_now);
                Err(Refusal::new(
                    Reason::GlobalOverLimit,
                    limit,
                    in_window,
                    wait,
                ))
            }
            // Without Redis the turn cannot be checked: queue again (then on the local share).
            Err(_) => Err(again),
        }
    }

    async fn confirm(&self, grant: &mut Grant) -> Result<(), Refusal> {
        let policy = self.policy.load();
        let moves: Vec<Move> = (grant.stamps.iter().flatten())
            .map(|s| Move {
                key: s.key,
                quota: match s.key {
                    Key::GLOBAL => policy.global.unwrap_or(s.quota),
                    key => policy.quota_for(key),
                },
                at: (s.at / 1000) as Micros,
                seq: s.at % 1000,
                new_seq: self.next_seq(),
            })
            .collect();
        let inv = script::confirm(&self.layout, &self.replica, &moves);
        let limit = grant.rate.limit;
        let refused = |reason| Refusal::new(reason, limit, 0, Duration::ZERO);
        match self.call(&inv, script::confirm_reply).await {
            Ok(Confirmed::Moved(now, seqs)) => {
                let moved = grant.stamps.iter_mut().flatten().zip(&moves);
                for ((slot, m), seq) in moved.zip(seqs.into_iter().chain(std::iter::repeat(0))) {
                    *slot = stamp(m.key, m.quota, now, seq);
                }
                self.stats
                    .tokens_restamped
                    .fetch_add(moves.len() as u64, Ordering::Relaxed);
                Ok(())
            }
            Ok(Confirmed::Paused) => Err(refused(Reason::Paused)),
            Ok(Confirmed::NoLongerFits) | Err(_) => Err(refused(Reason::NoLongerFits)),
        }
    }

    /// While the breaker is open: asks Redis. Once it answers, the local share's admissions of
    /// the last window are written into Redis and, for one more window, each new one as it is
    /// made, so that when the budget is shared again (the breaker closes after that window)
    /// Redis counts everything this replica sent; the other replicas do the same as they find
    /// Redis back. If Redis fails again meanwhile, the return starts over.
    async fn probe(&self) {
        let now = Instant::now();
        let returning = *lock(&self.returning_until);
        let inv = script::ping(&self.layout, &self.replica);
        if self.link.invoke(&inv).await.is_err() {
            *lock(&self.returning_until) = None;
            return;
        }
        match returning {
            Some(until) if now >= until => self.close(),
            Some(_) => {}
            // Nothing sent on the local share lately: nothing for Redis to learn.
            None if self.fallback.recent(now).is_empty() => self.close(),
            None => {
                // Returning from now on, so admissions made while the sync runs are written too.
                let window = window_of(&self.policy.load().default);
                *lock(&self.returning_until) = Some(now + window);
                if !self.sync(now).await {
                    *lock(&self.returning_until) = None;
                }
            }
        }
    }

    fn close(&self) {
        *lock(&self.returning_until) = None;
        let closed = lock(&self.breaker).success();
        if closed == Transition::Closed {
            self.open.store(false, Ordering::Relaxed);
            self.stats.breaker_closed.fetch_add(1, Ordering::Relaxed);
            tracing::info!("Redis answers again: the budget is shared");
        }
    }

    /// Writes the local share's admissions of the last window into Redis.
    async fn sync(&self, now: Instant) -> bool {
        let window = window_of(&self.policy.load().default);
        for (key, ages) in self.fallback.recent(now) {
            let stamps: Vec<(Micros, u64)> = ages
                .iter()
                .map(|age| (age / 1000, self.next_seq()))
                .collect();
            for chunk in stamps.chunks(256) {
                let inv = script::record(&self.layout, &self.replica, key, micros(window), chunk);
                if self.link.invoke(&inv).await.is_err() {
                    return false;
                }
            }
        }
        true
    }

    /// Releases the stamps Redis granted to a request that is no longer waiting for them.
    fn give_back(self: &Arc<Self>, key: Key, reply: &Reply) {
        let Answer::Admitted { at, global, .. } = reply.answer else {
            return;
        };
        let mut stamps = vec![(key, at, reply.ask.key_seq)];
        if let Some(GlobalSlot::At(g)) = global {
            stamps.push((Key::GLOBAL, g, reply.ask.global_seq));
        }
        self.release_stamps(stamps);
    }

    /// Gives `stamps` (key, at, sequence number) back, in a task of its own.
    fn release_stamps(self: &Arc<Self>, stamps: Vec<(Key, Micros, u64)>) {
        let inner = self.clone();
        tokio::spawn(async move {
            let inv = script::release(&inner.layout, &inner.replica, &stamps);
            if inner.call(&inv, Ok).await.is_ok() {
                (inner.stats.tokens_released).fetch_add(stamps.len() as u64, Ordering::Relaxed);
            }
        });
    }

    /// While returning to Redis: writes a local admission into it as well.
    fn record_returning(self: &Arc<Self>, grant: &Grant, now: Instant) {
        if lock(&self.returning_until).is_none() {
            return;
        }
        let window = micros(window_of(&self.policy.load().default));
        let ago = micros(now.saturating_duration_since(grant.at))
            - micros(grant.at.saturating_duration_since(now));
        let keys: Vec<Key> = grant.stamps.iter().flatten().map(|s| s.key).collect();
        let inner = self.clone();
        tokio::spawn(async move {
            for key in keys {
                let inv = script::record(
                    &inner.layout,
                    &inner.replica,
                    key,
                    window,
                    &[(ago, inner.next_seq())],
                );
                let _ = inner.link.invoke(&inv).await;
            }
        });
    }
}

/// Serves a lane: takes everyone waiting, charges them in one call, hands out the answers, and
/// again until no one waits.
async fn drive(inner: Arc<Inner>, key: Key, lane: Arc<Lane>) {
    loop {
        let batch: Vec<Waiter> = {
            let mut state = lock(&lane.state);
            if state.waiting.is_empty() {
                state.busy = false;
                return;
            }
            let n = state.waiting.len().min(MAX_BATCH);
            state.waiting.drain(..n).collect()
        };
        let policy = inner.policy.load();
        let asks: Vec<Ask> = (batch.iter())
            .map(|w| Ask {
                max_wait: micros(w.max_wait),
                key_seq: inner.next_seq(),
                global_seq: inner.next_seq(),
            })
            .collect();
        let inv = script::acquire(
            &inner.layout,
            &inner.replica,
            key,
            policy.quota_for(key),
            policy.global,
            &asks,
        );
        let answer = inner.call(&inv, script::acquire_reply).await;
        let local_now = Instant::now();
        match answer {
            Ok((redis_now, answers)) if answers.len() == batch.len() => {
                let mut dry = None;
                for ((waiter, ask), answer) in batch.into_iter().zip(asks).zip(answers) {
                    if let Answer::KeyDenied { next_free, .. } = answer {
                        dry = Some(local_now + from_micros(next_free - redis_now));
                    }
                    let reply = Reply {
                        redis_now,
                        local_now,
                        ask,
                        answer,
                    };
                    // The request went away while its call was in flight: its token goes back.
                    if let Err(Ok(unclaimed)) = waiter.reply.send(Ok(reply)) {
                        inner.give_back(key, &unclaimed);
                    }
                }
                if let Some(dry) = dry {
                    let mut state = lock(&lane.state);
                    state.dry_until = Some(state.dry_until.map_or(dry, |d| d.max(dry)));
                }
            }
            other => {
                let error = match other {
                    Err(error) => error,
                    Ok(_) => LinkError::Reply("one answer per token expected".into()),
                };
                for waiter in batch {
                    let _ = waiter.reply.send(Err(error.clone()));
                }
            }
        }
    }
}

/// Probes an open breaker and drops idle lanes, until the budget is dropped.
fn spawn_upkeep(inner: Weak<Inner>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(PROBE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let now = tick.tick().await;
            let Some(inner) = inner.upgrade() else { break };
            if inner.open.load(Ordering::Relaxed) {
                inner.probe().await;
            } else if !inner.proven.load(Ordering::Relaxed) || lock(&inner.breaker).is_failing() {
                // At start, and after a failure: ask Redis even without traffic, so the mode
                // shown is true and a Redis that stays away opens the breaker.
                let inv = script::ping(&inner.layout, &inner.replica);
                if inner.call(&inv, Ok).await.is_ok() {
                    inner.proven.store(true, Ordering::Relaxed);
                }
            }
            let window = window_of(&inner.policy.load().default);
            inner.lanes.retain(|_, lane| {
                let state = lock(&lane.state);
                state.busy
                    || state
                        .used
                        .is_some_and(|t| now.saturating_duration_since(t) < 2 * window)
                    || state.dry_until.is_some_and(|d| d > now)
            });
            inner.fallback.sweep(now);
        }
    });
}

/// The local share of `policy`: each limit divided by the replicas expected, at least 1.
fn share(policy: &Policy, replicas: u32) -> Policy {
    let part = |q: Quota| Quota {
        capacity: (q.capacity / replicas.max(1)).max(1),
        ..q
    };
    Policy {
        default: part(policy.default),
        overrides: policy
            .overrides
            .iter()
            .map(|(k, q)| (*k, part(*q)))
            .collect(),
        global: policy.global.map(part),
        ..policy.clone()
    }
}

/// A stamp of the shared budget: Redis microseconds, with the member's sequence number in the
/// last three decimal digits of its nanoseconds.
fn stamp(key: Key, quota: Quota, at: Micros, seq: u64) -> Stamp {
    Stamp {
        key,
        quota,
        at: (at.max(0) as Nanos) * 1000 + seq % 1000,
    }
}

fn window_of(quota: &Quota) -> Duration {
    Duration::from_nanos(quota.window)
}

fn micros(d: Duration) -> Micros {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

fn from_micros(us: Micros) -> Duration {
    Duration::from_micros(us.max(0) as u64)
}

/// A random name for this replica's stamps.
fn replica_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.write_u32(std::process::id());
    format!("{:012x}", hasher.finish() & 0xffff_ffff_ffff)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
