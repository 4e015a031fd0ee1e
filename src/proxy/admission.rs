//! The admission step: how a request gets its rate token and its upstream connection.
//!
//! # When the token is stamped
//! A request first takes its token from the budget (waiting its turn in `queue` mode), then a
//! ready upstream connection. If getting the connection took longer than half the window margin,
//! the token's stamp moves to the moment the request leaves, provided no window would then exceed
//! the limit; otherwise the request gives its token and its connection back and queues again (at
//! most [`MAX_ATTEMPTS`] times, then 429). A token therefore counts from the moment its request
//! leaves, not from when it started waiting for a connection or a TLS handshake: the guarantee is
//! about arrivals at the upstream.
//!
//! # Queueing, departures, pauses and the drain
//! - A request granted a future slot sleeps until it. A client that goes away meanwhile drops
//!   this future, and its slot goes back to the budget for the next request to take.
//! - With a global ceiling, a queued request takes its global token only when its key's turn
//!   comes (and may queue for that too), so waiting for one key never holds others back.
//! - If the upstream answered 429 for the key while the request slept and its slot falls inside
//!   the pause, it queues again behind the pause.
//! - An upstream 429 pauses the key for as long as the upstream asked (see
//!   [`Admission::upstream_refused`]): the budget was wrong, so nothing more is sent until then.
//! - From the moment shutdown begins ([`Admission::drain`]) no request waits past the drain
//!   deadline: those whose turn would come later are refused at once rather than cut off, and a
//!   request still waiting for the upstream near the end of the grace period gets 504 code 24
//!   ([`Admission::cut_off`]) instead of an empty reply when the process exits.
//!
//! The step talks only to the [`Budget`] interface, so a budget kept elsewhere than in this
//! process fits in without change here.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::ctx::RequestCtx;
use crate::clients::Lane;
use crate::error::ProxyError;
use crate::limiter::{Budget, Grant, Key, KnownKeys, RateState, Reason, Refusal};
use crate::upstream::{Busy, Lease, Standing, Upstream, UpstreamError};

/// How often a request may queue again because its token no longer fitted by the time it had a
/// connection (a slow or saturated upstream); then it is answered 429.
pub const MAX_ATTEMPTS: u32 = 4;

/// The admission step, shared by every request.
#[derive(Debug)]
pub struct Admission {
    budget: Arc<dyn Budget>,
    /// Set when shutdown begins: no request may wait past this.
    drain: watch::Sender<Option<Instant>>,
    /// Set when shutdown begins: every request is answered by then, before the grace period ends.
    answer_by: watch::Sender<Option<Instant>>,
    /// Requests asleep until their queued slot.
    queued: AtomicUsize,
    /// Keys the upstream lately answered with success: first in line for a connection.
    known: KnownKeys,
    /// Keys paused after an upstream 429, since start.
    pauses: AtomicU64,
}

impl Admission {
    pub fn new(budget: Arc<dyn Budget>) -> Self {
        Self {
            budget,
            drain: watch::Sender::new(None),
            answer_by: watch::Sender::new(None),
            queued: AtomicUsize::new(0),
            known: KnownKeys::default(),
            pauses: AtomicU64::new(0),
        }
    }

    /// The budget requests are admitted against.
    pub fn budget(&self) -> &dyn Budget {
        &*self.budget
    }

    /// Requests asleep in a queue now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Keys paused after an upstream 429 since start (a 429 for a key already paused is not
    /// another pause).
    pub fn pauses(&self) -> u64 {
        self.pauses.load(Ordering::Relaxed)
    }

    /// Shutdown: from now on no request waits past `queue_until`, and queued requests whose turn
    /// would come later are woken and refused (429, code 25); a request still waiting for the
    /// upstream at `answer_by` is answered 504 (code 24) then, before the grace period ends.
    pub fn drain(&self, queue_until: Instant, answer_by: Instant) {
        self.drain.send_replace(Some(queue_until));
        self.answer_by.send_replace(Some(answer_by));
    }

    /// Completes when a request still waiting for the upstream must be answered without it: at
    /// the drain's `answer_by`; never while the proxy is not draining.
    pub async fn cut_off(&self) {
        let mut answer_by = self.answer_by.subscribe();
        let at = match answer_by.wait_for(Option::is_some).await {
            Ok(at) => *at,
            Err(_) => None,
        };
        match at {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    }

    /// The upstream answered a request of `key` with success: its later requests are first in
    /// line for a connection.
    pub fn succeeded(&self, key: Key) {
        self.known.note_success(key, Instant::now());
    }

    /// Whether `key` had a success from the upstream within `ttl` (it may read the cache).
    pub fn is_known_within(&self, key: Key, ttl: std::time::Duration) -> bool {
        self.known.is_known_within(key, Instant::now(), ttl)
    }

    /// The upstream answered `key` with 401: it is not known any more.
    pub fn forget(&self, key: Key) {
        self.known.forget(key);
    }

    /// The key's standing now, without spending (for requests refused before admission).
    pub fn standing(&self, key: Key) -> RateState {
        self.budget.peek(key, Instant::now())
    }

    /// Admits a request of `key`: its token (queueing up to `max_wait`), then a ready connection
    /// of `upstream` (in turn with other keys waiting), then the token confirmed at departure, or
    /// all of it again. On success the token is spent, and the connection is the request's to
    /// send on until the returned deadline for the upstream's answer.
    pub async fn admit(
        &self,
        key: Key,
        max_wait: Duration,
        upstream: &Upstream,
        ctx: &mut RequestCtx,
    ) -> Result<(Lease, Instant, Grant), ProxyError> {
        let since = Instant::now();
        // From its first token on, a request has `request_timeout` for its connection and the
        // upstream's answer together, whatever re-queueing happens between.
        let mut deadline = None;
        let mut attempt = 1;
        let app = ctx.app.clone();
        let lane = app.as_ref().map(|app| (&app.lane, app.index));
        loop {
            let mut held = match self.token(key, lane, since, max_wait).await {
                Ok(held) => held,
                Err(refusal) => return Err(refused(ctx, refusal)),
            };
            ctx.rate = Some(held.grant.rate);
            ctx.waited = held.grant.at.saturating_duration_since(since);
            let deadline = *deadline.get_or_insert_with(|| upstream.deadline());
            let standing = match self.known.is_known(key, Instant::now()) {
                true => Standing::Known,
                false => Standing::Unknown,
            };
            let lease = match upstream.checkout(key.id(), standing, deadline).await {
                Ok(lease) => lease,
                // The key already waits for its share of the connections: its own 429.
                Err(UpstreamError::Busy(Busy::ShareSpent)) => {
                    let limit = held.grant.rate.limit;
                    let wait = Duration::from_secs(1);
                    return Err(refused(
                        ctx,
                        Refusal::new(Reason::ConnectionShare, limit, 0, wait),
                    ));
                }
                Err(error) => return Err(error.into()),
            };
            match self.budget.confirm(&mut held.grant, Instant::now()).await {
                Ok(()) => {
                    let grant = held.grant.clone();
                    held.sent();
                    return Ok((lease, deadline, grant));
                }
                Err(refusal) if attempt >= MAX_ATTEMPTS => return Err(refused(ctx, refusal)),
                // The token no longer fits: give the connection back (then the token, as `held`
                // drops) and queue again, holding nothing while waiting.
                Err(_) => drop(lease),
            }
            attempt += 1;
        }
    }

    /// The request's token: at once, or after sleeping until its turn (perhaps more than once: a
    /// queued request takes its global token when its key's turn comes, and may queue for that
    /// too). `max_wait` counts from `since`, the request's first try.
    ///
    /// A request of an app goes by its key's lane (`clients::fair`): in queue mode the lane
    /// hands it a token in the order of shares and priorities; in reject mode the lane may
    /// refuse it first, to keep the key's last tokens for apps under their share.
    async fn token(
        &self,
        key: Key,
        lane: Option<(&Arc<Lane>, usize)>,
        since: Instant,
        max_wait: Duration,
    ) -> Result<Held<'_>, Refusal> {
        let mut drained = self.drain.subscribe();
        if let Some((lane, app)) = lane {
            if !max_wait.is_zero() {
                let _queued = Queued::enter(&self.queued);
                let until = since + max_wait;
                let grant = lane
                    .turn(app, &self.budget, max_wait, until, &mut drained)
                    .await?;
                return Ok(Held::new(&*self.budget, grant));
            }
            let now = Instant::now();
            let rate = self.budget.peek(key, now);
            lane.check(app, rate.limit, rate.remaining, now)?;
        }
        'queue: loop {
            let now = Instant::now();
            let wait = self.wait_left(&mut drained, since, max_wait, now);
            let mut held = Held::new(&*self.budget, self.budget.acquire(key, now, wait).await?);
            let mut due = held.grant.at <= now && !held.grant.pending;
            while !due {
                let grant = &held.grant;
                self.sleep_until(&mut drained, grant.at, grant.queue_limit)
                    .await?;
                let now = Instant::now();
                let wait = self.wait_left(&mut drained, since, max_wait, now);
                match self.budget.resume(&mut held.grant, now, wait).await {
                    Ok(()) => due = held.grant.at <= now && !held.grant.pending,
                    // Paused by an upstream 429 while asleep: queue again behind the pause
                    // (dropping `held` gives this turn back).
                    Err(refusal) if refusal.reason == Reason::Paused => continue 'queue,
                    Err(refusal) => return Err(refusal),
                }
            }
            if let Some((lane, app)) = lane {
                lane.note_use(app, Instant::now());
            }
            return Ok(held);
        }
    }

    /// What is left of `max_wait` at `now`, and never past the drain deadline.
    fn wait_left(
        &self,
        drained: &mut watch::Receiver<Option<Instant>>,
        since: Instant,
        max_wait: Duration,
        now: Instant,
    ) -> Duration {
        let wait = max_wait.saturating_sub(now.saturating_duration_since(since));
        match *drained.borrow_and_update() {
            Some(deadline) => wait.min(deadline.saturating_duration_since(now)),
            None => wait,
        }
    }

    /// Sleeps until a queued turn at `at`, counted in the queue gauge. A drain whose deadline
    /// comes before `at` wakes it with a refusal (of the budget with `limit`) instead.
    async fn sleep_until(
        &self,
        drained: &mut watch::Receiver<Option<Instant>>,
        at: Instant,
        limit: u32,
    ) -> Result<(), Refusal> {
        if at <= Instant::now() {
            return Ok(());
        }
        let _queued = Queued::enter(&self.queued);
        let wake = tokio::time::sleep_until(at);
        tokio::pin!(wake);
        loop {
            tokio::select! {
                () = &mut wake => return Ok(()),
                changed = drained.changed() => {
                    let cut = *drained.borrow_and_update();
                    if changed.is_err() || cut.is_some_and(|deadline| at > deadline) {
                        let wait = at.saturating_duration_since(Instant::now());
                        return Err(Refusal::new(Reason::Draining, limit, 0, wait));
                    }
                }
            }
        }
    }

    /// A request about to leave again, later than its token was confirmed for (its pooled
    /// connection was stale and has been replaced): its stamps move to now if they still fit.
    /// If not, its tokens go back and it is refused.
    pub async fn reconfirm(
        &self,
        grant: &mut Grant,
        ctx: &mut RequestCtx,
    ) -> Result<(), ProxyError> {
        match self.budget.confirm(grant, Instant::now()).await {
            Ok(()) => Ok(()),
            Err(refusal) => {
                self.budget.release(grant);
                Err(refused(ctx, refusal))
            }
        }
    }

    /// The upstream answered 429 for `key`: the budget was wrong (another consumer shares the key
    /// or the IP, or TMDB tightened its limit). The key admits nothing for `wait` (each pause is
    /// logged once), and the refusal returned is what its client is shown when the upstream's
    /// body cannot pass through.
    pub fn upstream_refused(&self, key: Key, wait: Duration, ctx: &mut RequestCtx) -> Refusal {
        if self.budget.pause(key, Instant::now(), wait) {
            self.pauses.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                key = %key.fingerprint(),
                pause = ?wait,
                "upstream answered 429; pausing this key"
            );
        }
        let limit = ctx.rate.map_or(0, |rate| rate.limit);
        let refusal = Refusal::new(Reason::UpstreamRateLimited, limit, 0, wait);
        ctx.upstream_429 = Some(wait);
        ctx.rate = Some(RateState::from(&refusal));
        refusal
    }
}

/// Notes a refusal in the context (its rate state is what the client is told).
fn refused(ctx: &mut RequestCtx, refusal: Refusal) -> ProxyError {
    ctx.rate = Some(RateState::from(&refusal));
    ProxyError::RateLimited(refusal)
}

/// A grant whose tokens go back to the budget unless its request was sent.
struct Held<'a> {
    budget: &'a dyn Budget,
    grant: Grant,
    armed: bool,
}

impl<'a> Held<'a> {
    fn new(budget: &'a dyn Budget, grant: Grant) -> Self {
        Self {
            budget,
            grant,
            armed: true,
        }
    }

    /// The request leaves: its tokens stay spent.
    fn sent(mut self) {
        self.armed = false;
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.budget.release(&self.grant);
        }
    }
}

/// Counts a request asleep in a queue for as long as it sleeps, whatever way the sleep ends.
struct Queued<'a>(&'a AtomicUsize);

impl<'a> Queued<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
