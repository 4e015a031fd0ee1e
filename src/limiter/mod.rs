//! The rate limiter: one bucket per key, plus an optional global bucket, shared by every
//! connection.
//!
//! This facade is the only place a rate decision reads the clock (`tokio::time::Instant`, so tests
//! drive it with a paused clock). It knows nothing of HTTP: it answers [`Ticket`] (a token, to be
//! confirmed when the request leaves) or [`Rejection`], and the proxy turns those into headers and
//! bodies. Its [`Policy`] can be swapped at run time (reload); buckets keep their state.

pub mod bucket;
pub mod key;
pub mod store;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::LimitConfig;
pub use bucket::{CLOCK_SKEW, Decision, Nanos, Quota};
pub use key::{Identity, Key, Source};
pub use store::Store;

/// A request that may go upstream now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// Requests per second allowed for the key.
    pub limit: u32,
    /// Tokens still free after this request.
    pub remaining: u32,
    /// Time until another request could be admitted (zero while tokens remain).
    pub reset_after: Duration,
    /// Time this request waited in the queue.
    pub waited: Duration,
    /// When its token was stamped, on the limiter's clock.
    at: Nanos,
}

/// A request refused because its key (or the global budget) is over the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    /// Requests per second allowed for the key (or globally).
    pub limit: u32,
    /// Requests in the current window, this one included.
    pub count: u32,
    /// Time until a request could be admitted.
    pub retry_after: Duration,
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
    /// Longest a request may queue (zero in reject mode).
    pub max_wait: Nanos,
    /// How far a token's stamp may lie before the moment its request is sent (half the margin).
    pub tolerance: Nanos,
    /// Most keys with a bucket at once (`usize::MAX`: no cap).
    pub max_keys: usize,
}

impl Policy {
    /// The policy for `cfg`.
    pub fn new(cfg: &LimitConfig) -> Self {
        let window = duration_nanos(Duration::from_secs(1) + cfg.window_margin);
        let quota = |rps: u32| Quota {
            capacity: rps,
            window,
        };
        Self {
            default: quota(cfg.requests_per_second.get()),
            overrides: cfg
                .overrides
                .iter()
                .map(|(secret, rps)| (Key::of_configured(secret.expose()), quota(rps.get())))
                .collect(),
            global: cfg.global_requests_per_second.map(|rps| quota(rps.get())),
            max_wait: duration_nanos(cfg.max_wait),
            tolerance: duration_nanos(cfg.window_margin / 2),
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

/// The per-key limiter.
#[derive(Debug)]
pub struct Limiter {
    store: Store,
    policy: ArcSwap<Policy>,
    /// Origin of the limiter's nanosecond clock.
    epoch: Instant,
    /// Requests asleep in a queue now.
    waiting: AtomicUsize,
    /// When the table was last swept because it was full (limiter nanos), so a flood of new keys
    /// triggers at most one sweep per [`FULL_SWEEP_EVERY`].
    last_full_sweep: AtomicU64,
    /// Set when the proxy drains for shutdown: no queued slot may end after this.
    drain: watch::Sender<Option<Nanos>>,
}

// === impl Limiter ===

impl Limiter {
    /// A limiter for `cfg`, with its clock starting now.
    pub fn new(cfg: &LimitConfig) -> Self {
        Self {
            store: Store::default(),
            policy: ArcSwap::from_pointee(Policy::new(cfg)),
            epoch: Instant::now(),
            waiting: AtomicUsize::new(0),
            last_full_sweep: AtomicU64::new(0),
            drain: watch::Sender::new(None),
        }
    }

    /// Puts new limits in force. Buckets keep what they recorded: a key whose rate did not change
    /// carries on exactly; one whose rate changed is judged by the new rate from now on.
    pub fn set_policy(&self, policy: Policy) {
        self.policy.store(Arc::new(policy));
    }

    /// The limits in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.load_full()
    }

    fn now(&self) -> Nanos {
        duration_nanos(Instant::now().saturating_duration_since(self.epoch))
    }

    /// Takes a token for `key` (and from the global budget, if one is set), waiting in FIFO order
    /// when the token comes within what is left of `max_wait` after `already_waited`. If the
    /// returned future is dropped while waiting (the client went away), queued slots are given
    /// back; so are the tokens of a [`Ticket`] dropped before it was sent.
    pub async fn acquire(
        &self,
        key: Key,
        already_waited: Duration,
    ) -> Result<Ticket<'_>, Rejection> {
        let policy = self.policy.load_full();
        let start = self.now();
        let max_wait = policy
            .max_wait
            .saturating_sub(duration_nanos(already_waited));
        let quota = policy.quota_for(key);
        if !self.has_room_for(key, &policy, start) {
            return Err(Rejection {
                limit: quota.capacity,
                count: quota.capacity.saturating_add(1),
                retry_after: Duration::from_secs(1),
            });
        }
        let admission = self.admit(key, quota, start, max_wait).await?;
        let mut ticket = Ticket {
            limiter: self,
            admission,
            stamps: [
                Some(Stamp {
                    key,
                    quota,
                    at: admission.at,
                }),
                None,
            ],
            tolerance: policy.tolerance,
        };
        if let Some(global) = policy.global {
            let now = self.now();
            let budget = max_wait.saturating_sub(now - start);
            let granted = self.admit(Key::GLOBAL, global, now, budget).await?;
            ticket.admission.waited += granted.waited;
            ticket.stamps[1] = Some(Stamp {
                key: Key::GLOBAL,
                quota: global,
                at: granted.at,
            });
        }
        Ok(ticket)
    }

    /// Whether `key` has a bucket or may get one under `max_keys`. A full table is swept (at most
    /// once per [`FULL_SWEEP_EVERY`]) before a new key is turned away.
    fn has_room_for(&self, key: Key, policy: &Policy, now: Nanos) -> bool {
        if policy.max_keys == usize::MAX || self.store.contains(key) {
            return true;
        }
        if self.store.len() < policy.max_keys {
            return true;
        }
        let last = self.last_full_sweep.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= FULL_SWEEP_EVERY
            && self
                .last_full_sweep
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.store.retain_recent(now, policy.default);
        }
        self.store.len() < policy.max_keys
    }

    /// The key's rate state without taking a token: its limit, tokens free now, and the time
    /// until a request could be admitted (for requests refused before they spend anything).
    pub fn peek(&self, key: Key) -> (u32, u32, Duration) {
        let quota = self.policy.load().quota_for(key);
        let now = self.now();
        let (free, next) = self.store.peek(key, now, quota);
        (
            quota.capacity,
            free,
            Duration::from_nanos(next.saturating_sub(now)),
        )
    }

    /// Requests asleep in a queue now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Shutdown: from now on no request waits past `deadline`, and queued requests whose turn
    /// would come later are woken and refused (429, code 25) instead of being cut off.
    pub fn drain(&self, deadline: Instant) {
        let deadline = duration_nanos(deadline.saturating_duration_since(self.epoch));
        self.drain.send_replace(Some(deadline));
    }

    /// Stamps a token of `key` at `now` (or at the first free slot within `max_wait`, waiting
    /// for it).
    async fn admit(
        &self,
        key: Key,
        quota: Quota,
        start: Nanos,
        max_wait: Nanos,
    ) -> Result<Admission, Rejection> {
        let mut drained = self.drain.subscribe();
        let mut now = start;
        loop {
            let budget = max_wait.saturating_sub(now - start);
            let budget = match *drained.borrow_and_update() {
                Some(deadline) => budget.min(deadline.saturating_sub(now)),
                None => budget,
            };
            let (at, remaining, next_free) = match self.store.check_at(key, now, quota, budget) {
                Decision::Deny { count, next_free } => {
                    return Err(Rejection {
                        limit: quota.capacity,
                        count,
                        retry_after: Duration::from_nanos(next_free.saturating_sub(now)),
                    });
                }
                Decision::Admit {
                    at,
                    remaining,
                    next_free,
                } => (at, remaining, next_free),
            };
            if at.saturating_sub(now) > CLOCK_SKEW {
                let slot = QueuedSlot {
                    limiter: self,
                    key,
                    at,
                    armed: true,
                };
                self.waiting.fetch_add(1, Ordering::Relaxed);
                let wake = tokio::time::sleep_until(self.epoch + Duration::from_nanos(at));
                tokio::pin!(wake);
                loop {
                    tokio::select! {
                        () = &mut wake => break,
                        changed = drained.changed() => {
                            let cut = *drained.borrow_and_update();
                            if changed.is_err() || cut.is_some_and(|deadline| at > deadline) {
                                // Dropping the slot gives it back.
                                return Err(Rejection {
                                    limit: quota.capacity,
                                    count: quota.capacity.saturating_add(1),
                                    retry_after: Duration::from_nanos(at.saturating_sub(self.now())),
                                });
                            }
                        }
                    }
                }
                // The upstream answered 429 while this request waited and its slot falls inside
                // the pause: it queues again (dropping the slot gives it back).
                if self.store.is_paused(key, at) {
                    now = self.now();
                    continue;
                }
                slot.used();
            }
            return Ok(Admission {
                limit: quota.capacity,
                remaining,
                reset_after: Duration::from_nanos(next_free.saturating_sub(at)),
                waited: Duration::from_nanos(at.saturating_sub(start)),
                at,
            });
        }
    }

    /// Admits nothing for `key` during `duration` (the upstream answered 429). Returns whether the
    /// key was not paused already, so each pause is reported once.
    pub fn pause(&self, key: Key, duration: Duration) -> bool {
        let now = self.now();
        self.store
            .pause(key, now, now.saturating_add(duration_nanos(duration)))
    }

    /// Drops buckets of keys that have gone idle; returns how many remain.
    pub fn sweep(&self) -> usize {
        self.store
            .retain_recent(self.now(), self.policy.load().default)
    }

    /// Buckets currently held.
    pub fn active_keys(&self) -> usize {
        self.store.len()
    }

    /// Runs [`Limiter::sweep`] every `every` until the limiter is dropped.
    pub fn spawn_sweeper(limiter: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Self> = Arc::downgrade(limiter);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(limiter) => {
                        let left = limiter.sweep();
                        tracing::trace!(active_keys = left, "swept idle buckets");
                    }
                    None => break,
                }
            }
        })
    }
}

/// One spent token: whose, under which quota, and when.
#[derive(Debug, Clone, Copy)]
struct Stamp {
    key: Key,
    quota: Quota,
    at: Nanos,
}

/// The tokens of a request that has not been sent yet: its key's, and the global one if set.
///
/// Between taking a token and sending, a request may wait for an upstream connection. The
/// guarantee is about arrivals upstream, so before sending, [`Ticket::confirm`] moves a stamp that
/// has grown stale to the present. Dropping an unsent ticket gives its tokens back.
#[derive(Debug)]
pub struct Ticket<'a> {
    limiter: &'a Limiter,
    admission: Admission,
    stamps: [Option<Stamp>; 2],
    tolerance: Nanos,
}

impl Ticket<'_> {
    /// The admission as it stands (the key's token).
    pub fn admission(&self) -> Admission {
        self.admission
    }

    /// Called with a ready connection in hand, just before sending. A stamp older than the
    /// tolerance (half the window margin) moves to the present, in one step under the bucket's
    /// lock, if no window would then exceed its capacity. If one does not fit, the request must
    /// queue again: its tokens are given back (the ticket is dropped) and the caller retries.
    pub fn confirm(mut self) -> Result<Admission, Rejection> {
        let limiter = self.limiter;
        let now = limiter.now();
        for slot in &mut self.stamps {
            let Some(stamp) = slot else { continue };
            // A key paused (upstream 429) while this request waited for a connection must not
            // send: restamping fails during a pause, so it queues again behind the pause.
            let paused = limiter.store.is_paused(stamp.key, now);
            if !paused && now.saturating_sub(stamp.at) <= self.tolerance {
                continue;
            }
            if paused || !limiter.store.restamp(stamp.key, stamp.at, now, stamp.quota) {
                return Err(Rejection {
                    limit: stamp.quota.capacity,
                    count: stamp.quota.capacity.saturating_add(1),
                    retry_after: Duration::from_nanos(stamp.quota.spacing()),
                });
            }
            stamp.at = now;
        }
        self.stamps = [None, None];
        Ok(self.admission)
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        for stamp in self.stamps.iter().flatten() {
            self.limiter.store.release(stamp.key, stamp.at);
        }
    }
}

/// A queued slot that is returned to its bucket unless the request actually went.
struct QueuedSlot<'a> {
    limiter: &'a Limiter,
    key: Key,
    at: Nanos,
    armed: bool,
}

impl QueuedSlot<'_> {
    fn used(mut self) {
        self.armed = false;
    }
}

impl Drop for QueuedSlot<'_> {
    fn drop(&mut self) {
        self.limiter.waiting.fetch_sub(1, Ordering::Relaxed);
        if self.armed {
            self.limiter.store.release(self.key, self.at);
        }
    }
}

/// Least time between two sweeps forced by a full table: 100 ms.
const FULL_SWEEP_EVERY: Nanos = 100_000_000;

fn duration_nanos(d: Duration) -> Nanos {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn limiter(toml: &str) -> Arc<Limiter> {
        Arc::new(Limiter::new(&Config::from_toml_str(toml).unwrap().limit))
    }

    #[tokio::test(start_paused = true)]
    async fn burst_then_reject_then_refill() {
        let l = limiter("[limit]\nrequests_per_second = 3\nmode = \"reject\"\n");
        let k = Key::from_credential("k");
        for remaining in [2, 1, 0] {
            assert_eq!(
                l.acquire(k, Duration::ZERO)
                    .await
                    .unwrap()
                    .confirm()
                    .unwrap()
                    .remaining,
                remaining
            );
        }
        let rejected = l.acquire(k, Duration::ZERO).await.unwrap_err();
        assert_eq!(rejected.count, 4);
        assert_eq!(rejected.retry_after, Duration::from_millis(1050));
        tokio::time::advance(Duration::from_millis(1050)).await;
        assert!(l.acquire(k, Duration::ZERO).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn unsent_ticket_gives_its_token_back() {
        let l = limiter("[limit]\nrequests_per_second = 1\nmode = \"reject\"\n");
        let k = Key::from_credential("k");
        drop(l.acquire(k, Duration::ZERO).await.unwrap());
        l.acquire(k, Duration::ZERO)
            .await
            .unwrap()
            .confirm()
            .unwrap();
        assert!(l.acquire(k, Duration::ZERO).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn stale_stamp_moves_to_the_moment_of_sending() {
        let l = limiter("[limit]\nrequests_per_second = 2\nmax_wait = \"2s\"\n");
        let k = Key::from_credential("k");
        // Token stamped at 0, but the request waits 400 ms for a connection.
        let slow = l.acquire(k, Duration::ZERO).await.unwrap();
        tokio::time::advance(Duration::from_millis(400)).await;
        let slow = slow.confirm().unwrap();
        assert_eq!(slow.waited, Duration::ZERO);
        // A fresh ticket within the tolerance keeps its stamp.
        let quick = l.acquire(k, Duration::ZERO).await.unwrap();
        tokio::time::advance(Duration::from_millis(10)).await;
        quick.confirm().unwrap();
        // Both tokens were stamped at 400 ms, so the next one is free at 1.45 s, 1.04 s from now.
        let start = Instant::now();
        let third = l
            .acquire(k, Duration::ZERO)
            .await
            .unwrap()
            .confirm()
            .unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(1040));
        assert_eq!(third.waited, Duration::from_millis(1040));
    }

    #[tokio::test(start_paused = true)]
    async fn queued_request_waits_for_its_slot() {
        let l = limiter("[limit]\nrequests_per_second = 1\nmax_wait = \"2s\"\n");
        let k = Key::from_credential("k");
        l.acquire(k, Duration::ZERO)
            .await
            .unwrap()
            .confirm()
            .unwrap();
        let start = Instant::now();
        let admitted = l
            .acquire(k, Duration::ZERO)
            .await
            .unwrap()
            .confirm()
            .unwrap();
        assert_eq!(admitted.waited, Duration::from_millis(1050));
        assert_eq!(start.elapsed(), Duration::from_millis(1050));
    }

    #[tokio::test(start_paused = true)]
    async fn abandoned_waiter_gives_its_slot_back() {
        let l = limiter("[limit]\nrequests_per_second = 1\nmax_wait = \"1500ms\"\n");
        let k = Key::from_credential("k");
        l.acquire(k, Duration::ZERO)
            .await
            .unwrap()
            .confirm()
            .unwrap();
        // A waiter that gives up after 100 ms.
        let gave_up =
            tokio::time::timeout(Duration::from_millis(100), l.acquire(k, Duration::ZERO)).await;
        assert!(gave_up.is_err());
        // Its slot (at 1.05 s) is free again, so this one fits within max_wait.
        let admitted = l
            .acquire(k, Duration::ZERO)
            .await
            .unwrap()
            .confirm()
            .unwrap();
        assert_eq!(admitted.waited, Duration::from_millis(950));
    }

    #[tokio::test(start_paused = true)]
    async fn draining_refuses_waiters_whose_turn_is_after_the_deadline() {
        let l = limiter("[limit]\nrequests_per_second = 1\nmax_wait = \"5s\"\n");
        let k = Key::from_credential("k");
        l.acquire(k, Duration::ZERO)
            .await
            .unwrap()
            .confirm()
            .unwrap();
        let (l2, l3) = (l.clone(), l.clone());
        // Two waiters: turns at 1.05 s and 2.1 s.
        let first = tokio::spawn(async move {
            l2.acquire(k, Duration::ZERO)
                .await
                .map(|t| t.confirm().unwrap())
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let second = tokio::spawn(async move {
            l3.acquire(k, Duration::ZERO)
                .await
                .map(|t| t.confirm().unwrap())
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(l.waiting(), 2);
        l.drain(Instant::now() + Duration::from_millis(1500));
        // The second is refused at once; the first still gets its turn within the grace.
        assert!(second.await.unwrap().is_err());
        assert!(first.await.unwrap().is_ok());
        assert_eq!(l.waiting(), 0);
        // New requests may not wait past the deadline either.
        assert!(l.acquire(k, Duration::ZERO).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_table_turns_new_keys_away_until_buckets_go_idle() {
        let l = limiter("[limit]\nrequests_per_second = 5\nmax_keys = 3\nmode = \"reject\"\n");
        for k in ["a", "b", "c"] {
            l.acquire(Key::from_credential(k), Duration::ZERO)
                .await
                .unwrap()
                .confirm()
                .unwrap();
        }
        let refused = l
            .acquire(Key::from_credential("d"), Duration::ZERO)
            .await
            .unwrap_err();
        assert_eq!((refused.count, refused.limit), (6, 5));
        // Known keys still get their tokens.
        assert!(
            l.acquire(Key::from_credential("a"), Duration::ZERO)
                .await
                .is_ok()
        );
        // Once the old buckets are idle, a full table sweeps itself for a newcomer.
        tokio::time::advance(Duration::from_millis(1100)).await;
        assert!(
            l.acquire(Key::from_credential("d"), Duration::ZERO)
                .await
                .is_ok()
        );
        assert_eq!(l.active_keys(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn sweeper_drops_idle_buckets() {
        let l = limiter("[limit]\nrequests_per_second = 5\nsweep_interval = \"1s\"\n");
        let _sweeper = Limiter::spawn_sweeper(&l, Duration::from_secs(1));
        for i in 0..100 {
            l.acquire(Key::from_credential(&format!("k{i}")), Duration::ZERO)
                .await
                .unwrap()
                .confirm()
                .unwrap();
        }
        assert_eq!(l.active_keys(), 100);
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert_eq!(l.active_keys(), 0);
    }
}
