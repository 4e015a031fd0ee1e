//! The local budget: every key's bucket in this process's memory.
//!
//! Each decision is made at once under one shard lock at a time (the key's, then the global
//! bucket's; see `store`), so the futures of the [`Budget`] interface are always ready. Times cross the interface as `tokio::time::Instant`
//! (paused in tests) and become nanoseconds since this budget's epoch inside, where the math is.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::time::Instant;

use super::bucket::{Bucket, CLOCK_SKEW, Decision, Nanos, Quota};
use super::budget::{Budget, Grant, Pending, Policy, RateState, Reason, Refusal, Stamp};
use super::key::Key;
use super::store::Store;

/// Least time between two sweeps forced by a full table: 100 ms.
const FULL_SWEEP_EVERY: Nanos = 100_000_000;

/// Retry-After for a new key turned away by a full table: buckets go idle within a window.
const TABLE_FULL_RETRY: Duration = Duration::from_secs(1);

/// Buckets in memory, one per key, plus the global one.
#[derive(Debug)]
pub struct LocalBudget {
    store: Store,
    policy: ArcSwap<Policy>,
    /// Origin of the budget's nanosecond clock.
    epoch: Instant,
    /// When the table was last swept because it was full, so a flood of new keys triggers at
    /// most one sweep per [`FULL_SWEEP_EVERY`].
    last_full_sweep: AtomicU64,
}

// === impl LocalBudget ===

impl LocalBudget {
    /// A budget under `policy`, its clock starting now.
    pub fn new(policy: Policy) -> Self {
        Self {
            store: Store::default(),
            policy: ArcSwap::from_pointee(policy),
            epoch: Instant::now(),
            last_full_sweep: AtomicU64::new(0),
        }
    }

    /// The budget's clock now, in its nanoseconds.
    fn clock(&self) -> Nanos {
        self.nanos(Instant::now())
    }

    /// The limits in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.load_full()
    }

    fn nanos(&self, t: Instant) -> Nanos {
        nanos(t.saturating_duration_since(self.epoch))
    }

    fn instant(&self, t: Nanos) -> Instant {
        self.epoch + Duration::from_nanos(t)
    }

    /// How long ago, at `now`, each key spent the tokens it holds (in nanoseconds; negative for
    /// queued ones, not yet due): what the shared budget writes into Redis when it takes over
    /// again.
    pub fn recent(&self, now: Instant) -> Vec<(Key, Vec<i64>)> {
        let (t, policy) = (self.nanos(now), self.policy.load());
        self.store.collect(|key, bucket| {
            let window = match key {
                Key::GLOBAL => policy.global.map_or(policy.default.window, |g| g.window),
                key => policy.quota_for(key).window,
            };
            let ages: Vec<i64> = (bucket.stamps().iter())
                .filter(|&&at| at.saturating_add(window) > t)
                .map(|&at| i64::try_from(t as i128 - at as i128).unwrap_or(i64::MIN))
                .collect();
            (!ages.is_empty()).then_some((key, ages))
        })
    }

    /// Drops buckets of keys that have gone idle by `now`; returns how many remain.
    pub fn sweep(&self, now: Instant) -> usize {
        self.store
            .retain_recent(self.nanos(now), self.policy.load().default)
    }

    /// Runs [`LocalBudget::sweep`] every `every` until the budget is dropped.
    pub fn spawn_sweeper(budget: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Self> = Arc::downgrade(budget);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let now = tick.tick().await;
                let Some(budget) = weak.upgrade() else { break };
                let left = budget.sweep(now);
                tracing::trace!(active_keys = left, "swept idle buckets");
            }
        })
    }

    /// Whether a new key may get a bucket under `max_keys`. A full table is swept (at most once
    /// per [`FULL_SWEEP_EVERY`]) before a newcomer is turned away.
    fn has_room(&self, policy: &Policy, now: Nanos) -> bool {
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

    pub(crate) fn try_acquire(
        &self,
        key: Key,
        now: Instant,
        max_wait: Duration,
    ) -> Result<Grant, Refusal> {
        let policy = self.policy.load();
        let quota = policy.quota_for(key);
        let (t, max_wait) = (self.nanos(now), nanos(max_wait));
        let (at, rate, t) = self.take_key_token(&policy, key, quota, t, max_wait)?;
        let mut grant = Grant {
            key,
            at: now,
            pending: false,
            queue_limit: quota.capacity,
            rate,
            stamps: [Some(Stamp { key, quota, at }), None],
            shared: false,
        };
        // A stamp within the clock skew of now is the present, not a queue to wait behind.
        if at.saturating_sub(t) > CLOCK_SKEW {
            // Queued for the key's turn: the global token is taken when that turn comes, so this
            // request holds no place at the ceiling ahead of other keys' requests meanwhile.
            grant.at = self.instant(at);
            grant.pending = policy.global.is_some();
            return Ok(grant);
        }
        if let Some(global) = policy.global
            && let Err(refusal) = self.take_global_token(&mut grant, global, t, max_wait)
        {
            self.release(&grant);
            return Err(refusal);
        }
        Ok(grant)
    }

    fn try_resume(
        &self,
        grant: &mut Grant,
        now: Instant,
        max_wait: Duration,
    ) -> Result<(), Refusal> {
        let t = self.nanos(now);
        let quota = self.policy.load().quota_for(grant.key);
        let paused = self
            .store
            .update_existing(grant.key, quota, |bucket| bucket.is_paused(t))
            .unwrap_or(false);
        if paused {
            return Err(Refusal::new(
                Reason::Paused,
                grant.rate.limit,
                0,
                Duration::ZERO,
            ));
        }
        if std::mem::take(&mut grant.pending)
            && let Some(global) = self.policy.load().global
        {
            grant.at = now;
            self.take_global_token(grant, global, t, nanos(max_wait))?;
        }
        Ok(())
    }

    /// A token of the global ceiling at `t`, or its slot within `max_wait` (then the grant's turn
    /// is that slot).
    fn take_global_token(
        &self,
        grant: &mut Grant,
        global: Quota,
        t: Nanos,
        max_wait: Nanos,
    ) -> Result<(), Refusal> {
        let decision = self.store.update(Key::GLOBAL, global, |bucket| {
            bucket.acquire(t, global, max_wait)
        });
        match decision {
            Decision::Admit { at, .. } => {
                grant.stamps[1] = Some(Stamp {
                    key: Key::GLOBAL,
                    quota: global,
                    at,
                });
                if at.saturating_sub(t) > CLOCK_SKEW {
                    grant.at = self.instant(at);
                    grant.queue_limit = global.capacity;
                }
                Ok(())
            }
            Decision::Deny {
                in_window,
                next_free,
            } => {
                let wait = Duration::from_nanos(next_free.saturating_sub(t));
                let limit = global.capacity;
                Err(Refusal::new(
                    Reason::GlobalOverLimit,
                    limit,
                    in_window,
                    wait,
                ))
            }
        }
    }

    /// The key's own token at `t` or its slot within `max_wait`, and its standing after it.
    fn take_key_token(
        &self,
        policy: &Policy,
        key: Key,
        quota: Quota,
        t: Nanos,
        max_wait: Nanos,
    ) -> Result<(Nanos, RateState, Nanos), Refusal> {
        // The decision's `now` is read under the key's lock (never before the caller's): of two
        // requests racing for a key, the one served first then has the earlier stamp, so neither
        // finds a stamp in its future and a key with a token left is never refused.
        let decide = |bucket: &mut Bucket| {
            let t = t.max(self.clock());
            (bucket.acquire(t, quota, max_wait), bucket.is_paused(t), t)
        };
        // A key whose earliest slot is beyond the wait is refused under a read lock, without a
        // write (the common case for a key far over its limit), judged at the same `now` the
        // slow path would use.
        let quick = self.store.quick(key).and_then(|quick| {
            let t = t.max(self.clock());
            let deny = quick.deny(t, quota, max_wait)?;
            Some((deny, quick.is_paused(t), t))
        });
        // A known key never waits on the table's size; a new one needs room under `max_keys`.
        let found = match quick {
            Some(denied) => Some(denied),
            None => self.store.update_existing(key, quota, decide),
        };
        let (decision, paused, t) = match found {
            Some(found) => found,
            None if policy.max_keys == usize::MAX || self.has_room(policy, t) => {
                self.store.update(key, quota, decide)
            }
            None => {
                let limit = quota.capacity;
                return Err(Refusal::new(Reason::TableFull, limit, 0, TABLE_FULL_RETRY));
            }
        };
        match decision {
            Decision::Admit {
                at,
                remaining,
                next_free,
            } => Ok((
                at,
                RateState {
                    limit: quota.capacity,
                    remaining,
                    reset_after: Duration::from_nanos(next_free.saturating_sub(at)),
                },
                t,
            )),
            Decision::Deny {
                in_window,
                next_free,
            } => {
                let reason = if paused {
                    Reason::Paused
                } else {
                    Reason::KeyOverLimit
                };
                let wait = Duration::from_nanos(next_free.saturating_sub(t));
                Err(Refusal::new(reason, quota.capacity, in_window, wait))
            }
        }
    }

    fn try_confirm(&self, grant: &mut Grant, now: Instant) -> Result<(), Refusal> {
        let t = self.nanos(now);
        let policy = self.policy.load();
        let tolerance = nanos(policy.tolerance);
        for stamp in grant.stamps.iter_mut().flatten() {
            // A stamp that moves is judged by the limits in force now: a reload that lowered
            // them while the request waited for a connection applies to it too.
            let quota = match stamp.key {
                Key::GLOBAL => policy.global.unwrap_or(stamp.quota),
                key => policy.quota_for(key),
            };
            let old = stamp.at;
            // The bucket may have been swept while the request waited for a connection, so it is
            // created if need be. A key paused (upstream 429) meanwhile must not send.
            let moved = self.store.update(stamp.key, quota, |bucket| {
                if bucket.is_paused(t) {
                    Err(Reason::Paused)
                } else if t.saturating_sub(old) <= tolerance {
                    Ok(old)
                } else if bucket.restamp(old, t, quota) {
                    Ok(t)
                } else {
                    Err(Reason::NoLongerFits)
                }
            });
            match moved {
                Ok(at) => stamp.at = at,
                Err(reason) => {
                    let wait = Duration::from_nanos(quota.spacing());
                    return Err(Refusal::new(reason, quota.capacity, 0, wait));
                }
            }
        }
        Ok(())
    }
}

impl Budget for LocalBudget {
    fn acquire(
        &self,
        key: Key,
        now: Instant,
        max_wait: Duration,
    ) -> Pending<'_, Result<Grant, Refusal>> {
        Pending::ready(self.try_acquire(key, now, max_wait))
    }

    fn resume<'a>(
        &'a self,
        grant: &'a mut Grant,
        now: Instant,
        max_wait: Duration,
    ) -> Pending<'a, Result<(), Refusal>> {
        Pending::ready(self.try_resume(grant, now, max_wait))
    }

    fn confirm<'a>(
        &'a self,
        grant: &'a mut Grant,
        now: Instant,
    ) -> Pending<'a, Result<(), Refusal>> {
        Pending::ready(self.try_confirm(grant, now))
    }

    fn release(&self, grant: &Grant) {
        let policy = self.policy.load();
        for stamp in grant.stamps.iter().flatten() {
            let quota = match stamp.key {
                Key::GLOBAL => policy.global.unwrap_or(stamp.quota),
                key => policy.quota_for(key),
            };
            self.store
                .update_existing(stamp.key, quota, |bucket| bucket.release(stamp.at));
        }
    }

    fn pause(&self, key: Key, now: Instant, wait: Duration) -> bool {
        let t = self.nanos(now);
        let quota = self.policy.load().quota_for(key);
        self.store.update(key, quota, |bucket| {
            bucket.pause(t, t.saturating_add(nanos(wait)))
        })
    }

    fn peek(&self, key: Key, now: Instant) -> RateState {
        let quota = self.policy.load().quota_for(key);
        let t = self.nanos(now);
        let (remaining, next) = self
            .store
            .update_existing(key, quota, |bucket| bucket.peek(t, quota))
            .unwrap_or((quota.capacity, t));
        RateState {
            limit: quota.capacity,
            remaining,
            reset_after: Duration::from_nanos(next.saturating_sub(t)),
        }
    }

    fn set_policy(&self, policy: Policy) {
        self.policy.store(Arc::new(policy));
    }

    fn tracked_keys(&self) -> usize {
        self.store.len()
    }
}

fn nanos(d: Duration) -> Nanos {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::collections::HashMap;

    const MS: Duration = Duration::from_millis(1);

    fn budget(toml: &str) -> LocalBudget {
        let cfg = Config::from_toml_str(toml).unwrap();
        LocalBudget::new(Policy::new(&cfg.limit, Key::of))
    }

    fn acquire(b: &LocalBudget, key: Key, max_wait: Duration) -> Result<Grant, Refusal> {
        b.try_acquire(key, Instant::now(), max_wait)
    }

    #[tokio::test(start_paused = true)]
    async fn burst_then_refusal_with_the_time_until_a_token_is_back() {
        let b = budget("[limit]\nrequests_per_second = 3\n");
        let k = Key::of("k");
        for remaining in [2, 1, 0] {
            let grant = acquire(&b, k, Duration::ZERO).unwrap();
            assert_eq!(grant.rate.remaining, remaining);
            assert_eq!(grant.at, Instant::now());
        }
        let refused = acquire(&b, k, Duration::ZERO).unwrap_err();
        assert_eq!(
            refused,
            Refusal {
                reason: Reason::KeyOverLimit,
                limit: 3,
                count: 4,
                retry_after: 1050 * MS,
            }
        );
        tokio::time::advance(1050 * MS).await;
        assert!(acquire(&b, k, Duration::ZERO).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_read_the_clock_before_another_still_gets_a_token_left() {
        let b = budget("[limit]\nrequests_per_second = 2\nmode = \"reject\"\n");
        let k = Key::of("k");
        // This request read the clock, then lost the race for the key's lock by 5 ms.
        let read_early = Instant::now();
        tokio::time::advance(5 * MS).await;
        acquire(&b, k, Duration::ZERO).unwrap();
        let late = b.try_acquire(k, read_early, Duration::ZERO).unwrap();
        assert_eq!(late.rate.remaining, 0);
        assert!(acquire(&b, k, Duration::ZERO).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_released_grant_gives_its_token_back() {
        let b = budget("[limit]\nrequests_per_second = 1\n");
        let k = Key::of("k");
        let grant = acquire(&b, k, Duration::ZERO).unwrap();
        b.release(&grant);
        acquire(&b, k, Duration::ZERO).unwrap();
        assert!(acquire(&b, k, Duration::ZERO).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_queued_grant_names_its_slot() {
        let b = budget("[limit]\nrequests_per_second = 1\n");
        let k = Key::of("k");
        let start = Instant::now();
        acquire(&b, k, Duration::ZERO).unwrap();
        let queued = acquire(&b, k, 2 * Duration::from_secs(1)).unwrap();
        assert_eq!(queued.at, start + 1050 * MS);
        assert_eq!(b.tracked_keys(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stale_stamp_moves_to_the_moment_of_sending() {
        let b = budget("[limit]\nrequests_per_second = 2\n");
        let k = Key::of("k");
        let start = Instant::now();
        // Token stamped at 0, but the request waits 400 ms for a connection.
        let mut slow = acquire(&b, k, Duration::ZERO).unwrap();
        tokio::time::advance(400 * MS).await;
        b.try_confirm(&mut slow, Instant::now()).unwrap();
        // A fresh grant within the tolerance keeps its stamp.
        let mut quick = acquire(&b, k, Duration::ZERO).unwrap();
        tokio::time::advance(10 * MS).await;
        b.try_confirm(&mut quick, Instant::now()).unwrap();
        // Both stamps are at 400 ms, so the next token is free at 1.45 s.
        let third = acquire(&b, k, Duration::from_secs(2)).unwrap();
        assert_eq!(third.at, start + 1450 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn confirm_refuses_during_a_pause_and_release_then_frees_the_token() {
        let b = budget("[limit]\nrequests_per_second = 1\n");
        let k = Key::of("k");
        let mut grant = acquire(&b, k, Duration::ZERO).unwrap();
        assert!(b.pause(k, Instant::now(), Duration::from_secs(2)));
        assert!(
            !b.pause(k, Instant::now(), Duration::from_secs(1)),
            "paused already"
        );
        let mut copy = grant.clone();
        let refused = b
            .try_resume(&mut copy, Instant::now(), Duration::ZERO)
            .unwrap_err();
        assert_eq!(refused.reason, Reason::Paused);
        let refused = b.try_confirm(&mut grant, Instant::now()).unwrap_err();
        assert_eq!(refused.reason, Reason::Paused);
        b.release(&grant);
        let refused = acquire(&b, k, Duration::ZERO).unwrap_err();
        assert_eq!(
            (refused.reason, refused.retry_after),
            (Reason::Paused, Duration::from_secs(2))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_global_ceiling_is_charged_too_and_refusal_gives_the_key_back() {
        let b = budget("[limit]\nrequests_per_second = 5\nglobal_requests_per_second = 2\n");
        let (a, c) = (Key::of("a"), Key::of("c"));
        let grant = acquire(&b, a, Duration::ZERO).unwrap();
        assert_eq!(grant.stamps[1].map(|s| s.key), Some(Key::GLOBAL));
        acquire(&b, c, Duration::ZERO).unwrap();
        let refused = acquire(&b, a, Duration::ZERO).unwrap_err();
        assert_eq!(
            (refused.reason, refused.limit, refused.count),
            (Reason::GlobalOverLimit, 2, 3)
        );
        // The key's own token was given back: it still has four.
        assert_eq!(b.peek(a, Instant::now()).remaining, 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_queued_request_takes_its_global_token_when_its_turn_comes() {
        let b = budget("[limit]\nrequests_per_second = 1\nglobal_requests_per_second = 2\n");
        let (a, c) = (Key::of("a"), Key::of("c"));
        let start = Instant::now();
        acquire(&b, a, Duration::ZERO).unwrap();
        // A's second request queues for its key's turn at 1.05 s, holding no global token yet.
        let mut queued = acquire(&b, a, Duration::from_secs(2)).unwrap();
        assert_eq!((queued.at, queued.pending), (start + 1050 * MS, true));
        assert_eq!(queued.stamps[1], None);
        // So another key is not held up at the ceiling meanwhile: the second global token is its.
        let other = acquire(&b, c, Duration::ZERO).unwrap();
        assert_eq!(other.at, start);
        // At A's turn the ceiling's tokens are still out (until 1.05 s after 0): they come back
        // right then, so the global token is taken at once.
        tokio::time::advance(1050 * MS).await;
        let now = Instant::now();
        b.try_resume(&mut queued, now, Duration::from_secs(1))
            .unwrap();
        assert_eq!((queued.at, queued.pending), (now, false));
        assert_eq!(queued.stamps[1].map(|s| s.key), Some(Key::GLOBAL));
    }

    #[tokio::test(start_paused = true)]
    async fn at_its_turn_a_request_may_queue_again_for_the_ceiling() {
        let b = budget("[limit]\nrequests_per_second = 1\nglobal_requests_per_second = 1\n");
        let (a, c) = (Key::of("a"), Key::of("c"));
        let start = Instant::now();
        acquire(&b, a, Duration::ZERO).unwrap();
        let mut queued = acquire(&b, a, Duration::from_secs(3)).unwrap();
        // Key C takes the ceiling's next token (at 1.05 s) first.
        tokio::time::advance(MS).await;
        let c_turn = acquire(&b, c, Duration::from_secs(3)).unwrap();
        assert_eq!(c_turn.at, start + 1050 * MS);
        // A's key turn comes at 1.05 s; its global turn is one window after C's.
        tokio::time::advance(1049 * MS).await;
        b.try_resume(&mut queued, Instant::now(), Duration::from_secs(2))
            .unwrap();
        assert_eq!(queued.at, start + 2100 * MS);
        assert_eq!(queued.queue_limit, 1);
        assert!(!queued.pending);
        // Without the wait for it, the ceiling refuses, naming its own limit.
        let mut late = acquire(&b, a, Duration::from_secs(3)).unwrap();
        tokio::time::advance(1050 * MS).await;
        let refused = b
            .try_resume(&mut late, Instant::now(), Duration::ZERO)
            .unwrap_err();
        assert_eq!(
            (refused.reason, refused.limit),
            (Reason::GlobalOverLimit, 1)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_table_turns_new_keys_away_until_buckets_go_idle() {
        let b = budget("[limit]\nrequests_per_second = 5\nmax_keys = 3\n");
        for k in ["a", "b", "c"] {
            acquire(&b, Key::of(k), Duration::ZERO).unwrap();
        }
        let refused = acquire(&b, Key::of("d"), Duration::ZERO).unwrap_err();
        assert_eq!(
            (refused.reason, refused.count, refused.limit),
            (Reason::TableFull, 6, 5)
        );
        // Known keys still get their tokens; a peek does not take a place in the table.
        assert!(acquire(&b, Key::of("a"), Duration::ZERO).is_ok());
        assert_eq!(b.peek(Key::of("e"), Instant::now()).remaining, 5);
        // Once the old buckets are idle, a full table sweeps itself for a newcomer.
        tokio::time::advance(1100 * MS).await;
        assert!(acquire(&b, Key::of("d"), Duration::ZERO).is_ok());
        assert_eq!(b.tracked_keys(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_sweeper_drops_idle_buckets() {
        let b = Arc::new(budget("[limit]\nrequests_per_second = 5\n"));
        let _sweeper = LocalBudget::spawn_sweeper(&b, Duration::from_secs(1));
        for i in 0..100 {
            acquire(&b, Key::of(&format!("k{i}")), Duration::ZERO).unwrap();
        }
        assert_eq!(b.tracked_keys(), 100);
        // Idle one window (1.05 s) after the last stamp; swept at the next tick (2 s).
        tokio::time::sleep(Duration::from_millis(1999)).await;
        assert_eq!(b.tracked_keys(), 100);
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert_eq!(b.tracked_keys(), 0);
    }

    /// Departures at `times`: the most in any one-second window starting at or after `from`.
    fn worst_second(times: &[Instant], from: Instant) -> usize {
        let mut sorted = times.to_vec();
        sorted.sort_unstable();
        (0..sorted.len())
            .filter(|&i| sorted[i] >= from)
            .map(|i| {
                sorted[i..]
                    .iter()
                    .take_while(|&&t| t < sorted[i] + Duration::from_secs(1))
                    .count()
            })
            .max()
            .unwrap_or(0)
    }

    /// (per key, global): the two policies a reload switches between in the departures run.
    const POLICIES: [(u32, u32); 2] = [(3, 5), (2, 4)];

    fn departures_policy((rps, global): (u32, u32)) -> Policy {
        let toml = format!(
            "[limit]\nrequests_per_second = {rps}\nglobal_requests_per_second = {global}\n"
        );
        Policy::new(&Config::from_toml_str(&toml).unwrap().limit, Key::of)
    }

    /// One random run of the departures property: what left when, per key and globally.
    #[derive(Default)]
    struct Departures {
        by_key: HashMap<Key, Vec<Instant>>,
        global: Vec<Instant>,
        /// The policy in force at the end, and from when every window is wholly its own.
        in_force: usize,
        settled: Option<Instant>,
    }

    /// Lets a held grant depart at `now` if its turn has come (resuming it first if it still
    /// lacks its global token); returns the grant if it must wait on.
    fn depart(
        b: &LocalBudget,
        mut grant: Grant,
        now: Instant,
        out: &mut Departures,
    ) -> Option<Grant> {
        if grant.at > now {
            return Some(grant);
        }
        if grant.pending {
            match b.try_resume(&mut grant, now, Duration::from_secs(2)) {
                Ok(()) if grant.at > now => return Some(grant),
                Ok(()) => {}
                Err(_) => {
                    b.release(&grant);
                    return None;
                }
            }
        }
        match b.try_confirm(&mut grant, now) {
            Ok(()) => {
                out.by_key.entry(grant.key).or_default().push(now);
                if grant.stamps[1].is_some() {
                    out.global.push(now);
                }
            }
            Err(_) => b.release(&grant),
        }
        None
    }

    fn run_departures(seed: u64) -> (LocalBudget, Departures) {
        use crate::fuzz::Rng;
        let keys = [Key::of("a"), Key::of("b"), Key::of("c")];
        let mut rng = Rng(seed);
        let mut out = Departures::default();
        let b = LocalBudget::new(departures_policy(POLICIES[0]));
        let mut now = b.epoch;
        let mut held: Vec<Grant> = Vec::new();
        for _ in 0..300 {
            match rng.below(12) {
                0..=3 => {
                    let key = keys[rng.below(3) as usize];
                    let wait = Duration::from_millis([0, 0, 500, 2000][rng.below(4) as usize]);
                    held.extend(b.try_acquire(key, now, wait));
                }
                4..=6 if !held.is_empty() => {
                    let grant = held.swap_remove(rng.below(held.len() as u64) as usize);
                    held.extend(depart(&b, grant, now, &mut out));
                }
                7 if !held.is_empty() => {
                    b.release(&held.swap_remove(rng.below(held.len() as u64) as usize));
                }
                8 => {
                    let key = keys[rng.below(3) as usize];
                    b.pause(key, now, Duration::from_millis(rng.below(1500)));
                }
                9 => {
                    b.sweep(now);
                }
                10 if rng.below(4) == 0 => {
                    out.in_force = 1 - out.in_force;
                    b.set_policy(departures_policy(POLICIES[out.in_force]));
                    // Turns granted before the reload keep their places: only once the last of
                    // them is a window old are all windows the new policy's.
                    let last_turn = held.iter().map(|g| g.at).max().unwrap_or(now);
                    out.settled = Some(now.max(last_turn) + 1050 * MS);
                }
                _ => now += Duration::from_millis(rng.below(300)),
            }
        }
        (b, out)
    }

    /// Any random run of acquires (now and queued), resumes, confirms at departure (late ones
    /// included), releases, pauses, sweeps and reloads, over three keys and a global ceiling:
    /// no one-second window of departures holds more than the limit, per key or globally, and
    /// once a reload has settled, none holds more than the new one.
    #[test]
    fn property_no_second_of_departures_exceeds_the_limits() {
        crate::fuzz::for_each_seed("departures", 0..200, |seed| {
            let (b, out) = run_departures(seed);
            let settled = out.settled.unwrap_or(b.epoch);
            let (key_now, global_now) = POLICIES[out.in_force];
            let checks = out
                .by_key
                .values()
                .map(|times| (times, 3, key_now))
                .chain(std::iter::once((&out.global, 5, global_now)));
            for (times, most, now_limit) in checks {
                let worst = worst_second(times, b.epoch);
                assert!(worst <= most, "seed {seed}: {worst} departures in a second");
                let worst = worst_second(times, settled);
                let limit = now_limit as usize;
                assert!(
                    worst <= limit,
                    "seed {seed}: {worst} after the reload settled"
                );
            }
        });
    }
}
