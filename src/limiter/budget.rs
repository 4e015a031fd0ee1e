//! The budget interface: what the admission step asks of a rate budget, whoever keeps it.
//!
//! A budget holds, per key, the tokens of a sliding-window log (the math is in `bucket`) and,
//! when one is set, a global ceiling across keys. The admission step (`proxy::admission`) talks
//! only to [`Budget`], so the local limiter ([`LocalBudget`](super::LocalBudget)) and a budget
//! shared by several replicas can stand in for each other without the proxy knowing which.
//!
//! What a budget is asked, in the order a request asks it:
//! 1. [`Budget::acquire`]: a token for a key at `now` (and one from the global ceiling), or the
//!    earliest slot within `max_wait`; else a [`Refusal`].
//! 2. [`Budget::resume`]: when a queued grant's turn comes. The budget checks that an upstream 429
//!    did not pause the key meanwhile (the request then queues again behind the pause) and takes
//!    what the grant still lacks: a queued request takes its global token only when its key's turn
//!    comes, so waiting for one key never holds up the others at the ceiling.
//! 3. [`Budget::confirm`]: at departure, with a ready upstream connection in hand: a stamp older
//!    than the tolerance moves to `now` if every window still fits, since the guarantee is about
//!    arrivals upstream. A refusal here means queue again.
//! 4. [`Budget::release`]: tokens of a grant that never left go back (the client went away, no
//!    connection came, confirm refused).
//! 5. [`Budget::pause`]: the upstream answered 429, so the budget was wrong: admit nothing for
//!    the key until it said to retry.
//!
//! [`Budget::peek`] reads a key's standing without spending, for requests refused before they
//! would spend anything.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use super::bucket::{Nanos, Quota};
use super::key::Key;
use crate::config::LimitConfig;

/// A rate budget. Implementations are shared by every connection.
pub trait Budget: Send + Sync + fmt::Debug {
    /// Takes a token for `key` at `now`, or reserves its earliest slot no later than
    /// `now + max_wait` (queue mode), charging the global ceiling too when one is set.
    fn acquire(
        &self,
        key: Key,
        now: Instant,
        max_wait: Duration,
    ) -> Pending<'_, Result<Grant, Refusal>>;

    /// Called when a queued grant's turn has come (`grant.at <= now`): refuses with
    /// [`Reason::Paused`] if the key was paused meanwhile, else takes what the grant still lacks,
    /// which may set `grant.at` later (the caller then waits again and calls again).
    fn resume<'a>(
        &'a self,
        grant: &'a mut Grant,
        now: Instant,
        max_wait: Duration,
    ) -> Pending<'a, Result<(), Refusal>>;

    /// Called just before the request leaves: moves stale stamps to `now` if they still fit. On a
    /// refusal the grant still names every stamp it holds (some may have moved): the caller
    /// releases them and queues again.
    fn confirm<'a>(
        &'a self,
        grant: &'a mut Grant,
        now: Instant,
    ) -> Pending<'a, Result<(), Refusal>>;

    /// Gives back the tokens of a grant whose request never left.
    fn release(&self, grant: &Grant);

    /// Admits nothing for `key` from `now` for `wait`. Returns whether the key was not paused
    /// already, so each pause is reported once.
    fn pause(&self, key: Key, now: Instant, wait: Duration) -> bool;

    /// The key's standing at `now`, without taking a token.
    fn peek(&self, key: Key, now: Instant) -> RateState;

    /// Puts new limits in force. Recorded stamps stay: a key whose rate did not change carries on
    /// exactly; one whose rate changed is judged by the new rate from now on.
    fn set_policy(&self, policy: Policy);

    /// Keys the budget holds state for now (a gauge).
    fn tracked_keys(&self) -> usize;

    /// The shared budget, if this is one (its mode and counters, for readiness and metrics).
    fn shared(&self) -> Option<&super::SharedBudget> {
        None
    }
}

/// A key's limit state, as a client is told it in the rate-limit headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateState {
    /// Requests per second allowed.
    pub limit: u32,
    /// Tokens still free.
    pub remaining: u32,
    /// Time until a token is next free (zero while tokens remain).
    pub reset_after: Duration,
}

impl From<&Refusal> for RateState {
    fn from(refusal: &Refusal) -> Self {
        Self {
            limit: refusal.limit,
            remaining: 0,
            reset_after: refusal.retry_after,
        }
    }
}

/// One spent (or reserved) token: whose, under which quota, and when, on the budget's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub key: Key,
    pub quota: Quota,
    pub at: Nanos,
}

/// Tokens granted to one request: its key's, and the global ceiling's when one is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The key the request spends.
    pub key: Key,
    /// When the request may leave, or its turn comes: `now` when a token was free, a later slot
    /// when it queued.
    pub at: Instant,
    /// Whether [`Budget::resume`] has something left to take when `at` comes.
    pub pending: bool,
    /// The limit of the budget whose turn `at` is (the key's or the global one), for a request
    /// refused while it waits.
    pub queue_limit: u32,
    /// The key's standing once this token is spent.
    pub rate: RateState,
    /// What [`Budget::resume`], [`Budget::confirm`] and [`Budget::release`] act on.
    pub stamps: [Option<Stamp>; 2],
    /// Issued by the shared budget (its stamps are on Redis's clock), not by a local one.
    pub shared: bool,
}

/// Why a request is answered 429 (code 25) without going upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The key's tokens are spent and its next slot is beyond the allowed wait.
    KeyOverLimit,
    /// The ceiling across all keys is spent.
    GlobalOverLimit,
    /// A new key while the table holds `max_keys` keys.
    TableFull,
    /// The upstream answered 429 for this key recently and asked to wait.
    Paused,
    /// Shutdown: the request's turn would come after the drain deadline.
    Draining,
    /// The request's token no longer fitted when it finally had a connection, too many times.
    NoLongerFits,
    /// The upstream itself answered 429 (its body was not TMDB's, so the proxy writes one).
    UpstreamRateLimited,
    /// Every upstream connection is busy and the key already waits for its share of them.
    ConnectionShare,
    /// The key is saturated and the app took its share of it (`[[clients.apps]]`).
    AppShare,
    /// The app is at its own `requests_per_second`.
    AppCap,
}

/// A request refused over a limit: why, and what its client is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub reason: Reason,
    /// Requests per second allowed for the key (or globally), as the client is told.
    pub limit: u32,
    /// Requests in the current window, this one included, as the client is told: always over
    /// `limit`, or the message would contradict the refusal.
    pub count: u32,
    /// Time until a request could be admitted; `Retry-After` is this rounded up, at least 1 s.
    pub retry_after: Duration,
}

impl Refusal {
    /// The one constructor. `in_window` is what the budget counted in the window without this
    /// request (0 where nothing was counted); the count shown is at least `limit + 1`.
    pub fn new(reason: Reason, limit: u32, in_window: u32, retry_after: Duration) -> Self {
        Self {
            reason,
            limit,
            count: in_window.max(limit).saturating_add(1),
            retry_after,
        }
    }
}

/// The limits in force. Swapped whole on reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Quota of a key without an override.
    pub default: Quota,
    /// Keys with a quota of their own (`[[limit.overrides]]`).
    pub overrides: HashMap<Key, Quota>,
    /// Budget shared by all keys (`global_requests_per_second`); a request needs a token from
    /// its key and from this.
    pub global: Option<Quota>,
    /// How far a token's stamp may lie before the moment its request is sent (half the margin).
    pub tolerance: Duration,
    /// Most keys with a bucket at once (`usize::MAX`: no cap).
    pub max_keys: usize,
}

impl Policy {
    /// The policy for `cfg`. `key_of` names the key a configured credential (an override's) spends.
    pub fn new(cfg: &LimitConfig, key_of: impl Fn(&str) -> Key) -> Self {
        let window = u64::try_from((Duration::from_secs(1) + cfg.window_margin).as_nanos())
            .unwrap_or(u64::MAX);
        let quota = |rps: u32| Quota {
            capacity: rps,
            window,
        };
        Self {
            default: quota(cfg.requests_per_second.get()),
            overrides: cfg
                .overrides
                .iter()
                .map(|(secret, rps)| (key_of(secret.expose()), quota(rps.get())))
                .collect(),
            global: cfg.global_requests_per_second.map(|rps| quota(rps.get())),
            tolerance: cfg.window_margin / 2,
            max_keys: cfg.max_keys.map_or(usize::MAX, |n| {
                usize::try_from(n.get()).unwrap_or(usize::MAX)
            }),
        }
    }

    /// The quota of `key`.
    pub fn quota_for(&self, key: Key) -> Quota {
        self.overrides.get(&key).copied().unwrap_or(self.default)
    }
}

/// A budget's answer: ready at once (the local budget decides under a lock, and costs no
/// allocation) or still to come (a budget that asks another process).
pub enum Pending<'a, T> {
    Ready(Option<T>),
    Later(Pin<Box<dyn Future<Output = T> + Send + 'a>>),
}

impl<'a, T> Pending<'a, T> {
    /// An answer already known.
    pub fn ready(value: T) -> Self {
        Self::Ready(Some(value))
    }

    /// An answer still to come.
    pub fn later(future: impl Future<Output = T> + Send + 'a) -> Self {
        Self::Later(Box::pin(future))
    }
}

impl<T: Unpin> Future for Pending<'_, T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        match self.get_mut() {
            // Like `std::future::Ready`, polling again after completion is a caller's bug.
            Self::Ready(value) => {
                Poll::Ready(value.take().expect("Pending polled after completion"))
            }
            Self::Later(future) => future.as_mut().poll(cx),
        }
    }
}

impl<T> fmt::Debug for Pending<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ready(_) => f.write_str("Pending::Ready"),
            Self::Later(_) => f.write_str("Pending::Later"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_count_shown_always_exceeds_the_limit() {
        let wait = Duration::from_millis(20);
        assert_eq!(Refusal::new(Reason::KeyOverLimit, 50, 50, wait).count, 51);
        assert_eq!(Refusal::new(Reason::Paused, 50, 3, wait).count, 51);
        assert_eq!(Refusal::new(Reason::KeyOverLimit, 50, 64, wait).count, 65);
        assert_eq!(
            Refusal::new(Reason::Draining, u32::MAX, 0, wait).count,
            u32::MAX
        );
        let rate = RateState::from(&Refusal::new(Reason::TableFull, 5, 0, wait));
        assert_eq!((rate.limit, rate.remaining, rate.reset_after), (5, 0, wait));
    }
}
