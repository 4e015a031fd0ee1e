//! Pure per-key bucket math. No map, no runtime, no clock: every function takes `now`.
//!
//! # Why not a classic token bucket
//! A bucket of capacity `B` refilled continuously at rate `r` admits up to `B + r·w` requests in a
//! window of length `w`. The proxy promises that the upstream never sees more than `N` arrivals for
//! one key in any one-second window, so a classic bucket would need `B ≈ 0` (no bursts) or
//! `r < N` (a lower rate). Instead each of the `N` tokens refills on its own exactly one `window`
//! after it was spent (`window` = 1 s plus a small margin for jitter between admission and arrival).
//! That is a sliding-window log: any window of length `window` holds at most `N` admissions, bursts
//! of up to `N` pass at once, and under sustained load `N` requests pass per `window`.
//!
//! # Pacing under sustained load
//! Tokens spent together come back together, so without more a key hammered without pause would
//! see its opening burst replayed once per window: bursts of `N` at the upstream, then silence.
//! Once a key's bucket has run dry, admissions are therefore also paced (a GCRA with emission
//! interval `window / N` and a small burst tolerance) until the bucket has been idle, and not found
//! dry, for a whole window. An occasional burst (a page load) passes at once; a sustained overload
//! is served as an even stream at `N` per window, which keeps arrivals insensitive to jitter and
//! the admitted rate steady in any window you measure. The sliding-window log stays the hard cap.
//!
//! Times are `u64` nanoseconds since the limiter's epoch, which keeps entries small and the math
//! exact.

use smallvec::SmallVec;

/// Nanoseconds since the limiter's epoch.
pub type Nanos = u64;

/// Most given-back slots a bucket remembers (each lookup checks them all under the map's lock).
const MAX_HOLES: usize = 64;

/// A caller that reads the clock before it takes the bucket's lock may be served after another
/// that read it later, and find a stamp slightly "in its future". The local budget reads `now`
/// under the lock, so it never does; for any other caller, stamps this close to `now` count as
/// the present rather than as a queue to wait behind: 1 ms.
pub const CLOCK_SKEW: Nanos = 1_000_000;

/// The limit applied to one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Tokens per window (`requests_per_second`).
    pub capacity: u32,
    /// How long a spent token stays spent: one second plus the margin.
    pub window: Nanos,
}

impl Quota {
    /// Gap between admissions while a bucket is paced: `window / capacity`.
    pub fn spacing(&self) -> Nanos {
        self.window / u64::from(self.capacity.max(1))
    }

    /// How far ahead of its paced slot a request may go while pacing: a few spacings (4% of the
    /// capacity, at least 2), so small concurrent bursts under the rate are not refused.
    pub fn pacing_tolerance(&self) -> Nanos {
        self.spacing() * u64::from((self.capacity / 25).max(2))
    }
}

/// What a refusal under a read lock needs of a bucket (see [`Bucket::quick_deny`]): small, so a
/// store keeps it inline beside a boxed bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quick {
    until: Nanos,
    /// The quota (`quick_tag`), and [`PAUSED`] when `until` is a pause's end.
    tag: u32,
}

/// The bit of [`Quick::tag`] that says `until` is a pause's end.
const PAUSED: u32 = 1 << 31;

impl Quick {
    /// [`Bucket::quick_deny`] from the copy.
    pub fn deny(&self, now: Nanos, quota: Quota, max_wait: Nanos) -> Option<Decision> {
        let same_quota = self.tag & !PAUSED == quick_tag(quota);
        let beyond = self.until > now.saturating_add(CLOCK_SKEW).saturating_add(max_wait);
        (same_quota && beyond).then_some(Decision::Deny {
            in_window: quota.capacity,
            next_free: self.until,
        })
    }

    /// [`Bucket::is_paused`] from the copy, for a time it refuses (`t` before `until`).
    pub fn is_paused(&self, t: Nanos) -> bool {
        self.tag & PAUSED != 0 && t < self.until
    }
}

/// A quota as [`Bucket::quick_deny`] compares it, in 32 bits: the capacity (at most 1,000,000,
/// 20 bits) and the window in whole milliseconds (at most 1.5 s, 11 bits). Two windows within
/// the same millisecond look alike; reloads move the margin by whole milliseconds or more.
fn quick_tag(quota: Quota) -> u32 {
    let window_ms = (quota.window / 1_000_000).min(0x7ff);
    (quota.capacity << 11) | u32::try_from(window_ms).unwrap_or(0x7ff)
}

/// What a bucket says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Admitted. The request may go at `at` (`== now` when a token is free, later in queue mode).
    Admit {
        /// When the request may be sent.
        at: Nanos,
        /// Tokens still free at `at` after this one.
        remaining: u32,
        /// Earliest time another request could be admitted.
        next_free: Nanos,
    },
    /// Refused: the request could not go within the allowed wait.
    Deny {
        /// Tokens held (spent or reserved) when it was refused, this request not included. While
        /// paced or paused this may be under the capacity.
        in_window: u32,
        /// Earliest time a request could be admitted.
        next_free: Nanos,
    },
}

/// Stamps in time order: a ring over a small vector that keeps the first two inline, so the
/// common bucket (a key with a request or two in the window) needs no heap allocation.
#[derive(Debug, Clone, Default)]
struct Log {
    buf: SmallVec<[Nanos; 2]>,
    /// Index of the oldest live stamp in `buf`; earlier ones were popped.
    head: usize,
}

impl std::ops::Deref for Log {
    type Target = [Nanos];

    fn deref(&self) -> &[Nanos] {
        &self.buf[self.head..]
    }
}

impl Log {
    fn pop_front(&mut self) {
        self.head += 1;
        if self.head == self.buf.len() {
            self.buf.clear();
            self.head = 0;
        } else if self.head >= 16 && self.head * 2 >= self.buf.len() {
            // Compact once the popped prefix outweighs the live part: amortised O(1) per pop.
            self.buf.drain(..self.head);
            self.head = 0;
        }
    }

    fn push_back(&mut self, t: Nanos) {
        self.buf.push(t);
    }

    fn insert(&mut self, i: usize, t: Nanos) {
        self.buf.insert(self.head + i, t);
    }

    fn remove(&mut self, i: usize) {
        self.buf.remove(self.head + i);
    }
}

/// One key's state: when each token still out was spent, oldest first.
///
/// Entries in the future are queued requests that were granted a slot and are waiting for it.
#[derive(Debug, Clone, Default)]
pub struct Bucket {
    spent: Log,
    /// While pacing: the theoretical time of the next paced admission (GCRA's TAT).
    pace: Option<Nanos>,
    /// Last time a request found every token spent.
    dry_at: Nanos,
    /// No request is admitted before this (the upstream answered 429 and said when to retry).
    paused_until: Nanos,
    /// Queued slots given back by requests that went away, offered to the next requests so a
    /// departed client's turn is not lost. Usually empty (no allocation).
    #[allow(clippy::box_collection)]
    // Boxed: 8 bytes in every bucket instead of 24 for a rare Vec.
    holes: Option<Box<Vec<Nanos>>>,
}

impl Bucket {
    /// Drops tokens that have refilled by `now`, and starts or stops pacing.
    fn refill(&mut self, now: Nanos, quota: Quota) {
        // A pause that is over is forgotten, so the quick copy knows none is running.
        if self.paused_until <= now {
            self.paused_until = 0;
        }
        while self
            .spent
            .first()
            .is_some_and(|&t| t.saturating_add(quota.window) <= now)
        {
            self.spent.pop_front();
        }
        if self.spent.len() >= quota.capacity as usize {
            self.dry_at = now;
            self.pace.get_or_insert(now);
        } else if self.spent.is_empty() && self.dry_at.saturating_add(quota.window) <= now {
            self.pace = None;
        }
    }

    /// Whether a token stamped at `t` keeps every window of length `window` at or under capacity:
    /// any `capacity + 1` consecutive stamps, `t` included, must span at least a window.
    fn fits(&self, t: Nanos, quota: Quota) -> bool {
        let cap = quota.capacity as usize;
        if self.spent.len() < cap {
            return true;
        }
        let p = self.spent.partition_point(|&e| e <= t);
        let len = self.spent.len() + 1;
        let at = |k: usize| match k.cmp(&p) {
            std::cmp::Ordering::Less => self.spent[k],
            std::cmp::Ordering::Equal => t,
            std::cmp::Ordering::Greater => self.spent[k - 1],
        };
        (p.saturating_sub(cap)..=p)
            .filter(|&i| i + cap < len)
            .all(|i| at(i + cap).saturating_sub(at(i)) >= quota.window)
    }

    /// The earliest usable slot given back by a departed request, if any.
    fn reusable_hole(&mut self, now: Nanos, quota: Quota) -> Option<Nanos> {
        let mut holes = self.holes.take()?;
        let floor = now.max(self.paused_until);
        holes.retain(|&h| h >= floor);
        holes.sort_unstable();
        let found = (0..holes.len()).find(|&i| self.fits(holes[i], quota));
        let hole = found.map(|i| holes.remove(i));
        if !holes.is_empty() {
            self.holes = Some(holes);
        }
        hole
    }

    /// Earliest time at or after `now` a new request could be admitted, keeping FIFO order behind
    /// queued requests. Assumes `refill(now)` has run.
    fn next_slot(&self, now: Nanos, quota: Quota) -> Nanos {
        let mut slot = now;
        if let Some(&last) = self.spent.last() {
            slot = slot.max(last);
        }
        if let Some(tat) = self.pace {
            slot = slot.max(tat.saturating_sub(quota.pacing_tolerance()));
        }
        slot = slot.max(self.paused_until);
        let held = self.spent.len();
        let cap = quota.capacity as usize;
        if held >= cap {
            // The token spent `cap` entries before the end must refill first.
            let oldest_blocking = self.spent[held - cap];
            slot = slot.max(oldest_blocking.saturating_add(quota.window));
        }
        slot
    }

    /// Tokens free at time `at`.
    fn free_at(&self, at: Nanos, quota: Quota) -> u32 {
        let refilled = self
            .spent
            .partition_point(|&t| t.saturating_add(quota.window) <= at);
        let in_window = self.spent.len() - refilled;
        quota
            .capacity
            .saturating_sub(u32::try_from(in_window).unwrap_or(u32::MAX))
    }

    /// A refusal decided without changing anything: `Some` only if the slow path
    /// ([`Bucket::acquire`]) would refuse too, because even the earliest slot as of the last
    /// change lies beyond `max_wait` (and the clock skew, which may move `now` forward). Nothing
    /// but a change makes that slot earlier: time passing only lets old stamps refill, and the
    /// slot already counts from the one that must refill first. A key far over its limit is
    /// refused this way, under the map's read lock, without touching its log.
    pub fn quick_deny(&self, now: Nanos, quota: Quota, max_wait: Nanos) -> Option<Decision> {
        self.quick(quota).deny(now, quota, max_wait)
    }

    /// What [`Bucket::quick_deny`] reads, as a copy a store keeps beside the bucket (refreshed
    /// after every change): `next_slot`'s terms that time alone cannot lift. Pacing may end once
    /// every stamp and the last dry moment are a window old, so its term counts only until then;
    /// a given-back slot may come earlier than all of them, so with one held there is none.
    ///
    /// A pause that may be running (it is forgotten once a refill finds it over) counts when it
    /// is the latest term, and is then what the copy says; a shorter one leaves no copy, so the
    /// reason of a refusal (a pause, or the limit) is always the slow path's.
    pub fn quick(&self, quota: Quota) -> Quick {
        let tag = quick_tag(quota);
        let until = match self.holes {
            Some(_) => 0,
            None => {
                let last = self.spent.last().copied().unwrap_or(0);
                let mut slot = last;
                if let Some(tat) = self.pace {
                    let pacing_ends = last.max(self.dry_at).saturating_add(quota.window);
                    let paced = tat.saturating_sub(quota.pacing_tolerance());
                    slot = slot.max(paced.min(pacing_ends));
                }
                let (held, cap) = (self.spent.len(), quota.capacity as usize);
                if held >= cap && cap > 0 {
                    slot = slot.max(self.spent[held - cap].saturating_add(quota.window));
                }
                slot
            }
        };
        let paused = self.paused_until;
        if paused == 0 {
            Quick { until, tag }
        } else if self.holes.is_none() && paused >= until {
            Quick {
                until: paused,
                tag: tag | PAUSED,
            }
        } else {
            Quick { until: 0, tag }
        }
    }

    /// Asks for a token at `now`, waiting at most `max_wait`. Admitted requests are recorded.
    pub fn acquire(&mut self, now: Nanos, quota: Quota, max_wait: Nanos) -> Decision {
        self.refill(now, quota);
        let now = match self.spent.last() {
            Some(&last) if last > now && last - now <= CLOCK_SKEW => last,
            _ => now,
        };
        let at = self.next_slot(now, quota);
        // A given-back slot helps only if it comes before the next one in line: one left behind
        // the end of the queue (everything after it was given back too) would make a request
        // that could leave now wait for it.
        if let Some(hole) = self.reusable_hole(now, quota) {
            if hole < at && hole - now <= max_wait {
                let p = self.spent.partition_point(|&e| e <= hole);
                self.spent.insert(p, hole);
                return Decision::Admit {
                    at: hole,
                    remaining: self.free_at(hole, quota),
                    next_free: self.next_slot(now, quota),
                };
            }
            self.holes.get_or_insert_default().push(hole);
        }
        if at - now > max_wait {
            return Decision::Deny {
                in_window: u32::try_from(self.spent.len()).unwrap_or(u32::MAX),
                next_free: at,
            };
        }
        self.spent.push_back(at);
        if let Some(tat) = self.pace {
            self.pace = Some(tat.max(at).saturating_add(quota.spacing()));
        }
        Decision::Admit {
            at,
            remaining: self.free_at(at, quota),
            next_free: self.next_slot(now, quota),
        }
    }

    /// Returns a slot granted for `at` that was never used (the client went away while waiting).
    /// Queued requests behind it keep their slots: moving them earlier could only add bursts.
    pub fn release(&mut self, at: Nanos) {
        // Entries are sorted; search from the back, where queued slots live.
        if let Some(i) = self.spent.iter().rposition(|&t| t == at) {
            self.spent.remove(i);
            // A slot other than the last leaves a hole the next request can take. (Holes in the
            // past are dropped when next looked at.)
            if self.spent.last().is_some_and(|&last| last > at) {
                let holes = self.holes.get_or_insert_default();
                // Bounded: a hole only helps until the queue passes it.
                if holes.len() < MAX_HOLES {
                    holes.push(at);
                }
            }
        }
    }

    /// Moves a token stamped at `old` to `now`, the moment its request actually leaves, if no
    /// window would then hold more than capacity and the key is not paused. Pacing and queue order
    /// are not consulted: the request already had its turn. A stamp that has meanwhile expired
    /// (the request waited more than a window for a connection) is simply taken anew. Returns
    /// false, changing nothing, if the token does not fit.
    pub fn restamp(&mut self, old: Nanos, now: Nanos, quota: Quota) -> bool {
        self.refill(now, quota);
        if self.is_paused(now) {
            return false;
        }
        let removed = self.spent.iter().rposition(|&t| t == old);
        if let Some(i) = removed {
            self.spent.remove(i);
        }
        if self.fits(now, quota) {
            let p = self.spent.partition_point(|&e| e <= now);
            self.spent.insert(p, now);
            true
        } else {
            if let Some(i) = removed {
                self.spent.insert(i, old);
            }
            false
        }
    }

    /// Whether nothing may be admitted at `t` because of an upstream 429.
    /// The stamps held, oldest first (queued ones last).
    pub fn stamps(&self) -> &[Nanos] {
        &self.spent
    }

    pub fn is_paused(&self, t: Nanos) -> bool {
        t < self.paused_until
    }

    /// Tokens free at `now` and the earliest time a request could be admitted, without taking one.
    pub fn peek(&mut self, now: Nanos, quota: Quota) -> (u32, Nanos) {
        self.refill(now, quota);
        (self.free_at(now, quota), self.next_slot(now, quota))
    }

    /// Admits nothing before `until`. Returns whether the bucket was not already paused at
    /// `now` (so the caller can report each pause once).
    pub fn pause(&mut self, now: Nanos, until: Nanos) -> bool {
        let newly = self.paused_until <= now;
        self.paused_until = self.paused_until.max(until);
        newly
    }

    /// Whether every token has refilled by `now` and no pause is running: such a bucket holds no
    /// information.
    pub fn is_idle(&self, now: Nanos, quota: Quota) -> bool {
        self.paused_until <= now
            && self
                .spent
                .last()
                .is_none_or(|&last| last.saturating_add(quota.window) <= now)
    }

    /// Tokens currently held (spent or reserved), for tests and metrics.
    pub fn held(&self) -> usize {
        self.spent.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::{Rng, for_each_seed};

    const MS: Nanos = 1_000_000;
    const SEC: Nanos = 1_000 * MS;

    fn quota(capacity: u32) -> Quota {
        Quota {
            capacity,
            window: SEC + 50 * MS,
        }
    }

    fn admitted(d: Decision) -> Nanos {
        match d {
            Decision::Admit { at, .. } => at,
            Decision::Deny { .. } => panic!("denied: {d:?}"),
        }
    }

    /// A slot given back behind the end of the queue is no reason to wait: a key with a token
    /// free now is admitted now.
    #[test]
    fn a_given_back_slot_past_the_queue_does_not_delay_a_free_token() {
        let q = quota(1);
        let w = q.window;
        let mut b = Bucket::default();
        let turns: Vec<Nanos> = (0..4).map(|_| admitted(b.acquire(0, q, 4 * SEC))).collect();
        assert_eq!(turns, [0, w, 2 * w, 3 * w]);
        // The queued requests go away without leaving, the one at 2w first: its slot is a hole.
        b.release(2 * w);
        b.release(3 * w);
        b.release(w);
        // A window after the key was last dry, its token is free, and pacing has ended.
        let now = w + 50 * MS;
        assert_eq!(admitted(b.acquire(now, q, 2 * SEC)), now);
    }

    /// A bucket stays small (memory per live key): its log, pacing, pause and given-back slots.
    #[test]
    fn bucket_is_compact() {
        assert!(
            std::mem::size_of::<Bucket>() <= 72,
            "{}",
            std::mem::size_of::<Bucket>()
        );
    }

    #[test]
    fn a_request_that_read_the_clock_a_moment_earlier_is_not_refused() {
        let q = quota(50);
        let mut b = Bucket::default();
        admitted(b.acquire(10 * SEC, q, 0));
        // Read the clock 200 µs before the first, took the lock after it.
        assert!(matches!(
            b.acquire(10 * SEC - 200_000, q, 0),
            Decision::Admit { .. }
        ));
    }

    #[test]
    fn burst_up_to_capacity_then_deny() {
        let q = quota(5);
        let mut b = Bucket::default();
        let t0 = 10 * SEC;
        for i in 0..5 {
            match b.acquire(t0, q, 0) {
                Decision::Admit { at, remaining, .. } => {
                    assert_eq!(at, t0);
                    assert_eq!(remaining, 4 - i);
                }
                d => panic!("{d:?}"),
            }
        }
        assert_eq!(
            b.acquire(t0 + MS, q, 0),
            Decision::Deny {
                in_window: 5,
                next_free: t0 + q.window
            }
        );
    }

    #[test]
    fn token_refills_one_window_after_it_was_spent() {
        let q = quota(2);
        let mut b = Bucket::default();
        admitted(b.acquire(0, q, 0));
        admitted(b.acquire(300 * MS, q, 0));
        assert!(matches!(
            b.acquire(q.window - 1, q, 0),
            Decision::Deny { .. }
        ));
        assert_eq!(admitted(b.acquire(q.window, q, 0)), q.window);
        // The second token is still out until 300 ms + window.
        assert!(matches!(
            b.acquire(q.window + MS, q, 0),
            Decision::Deny { .. }
        ));
        assert_eq!(
            admitted(b.acquire(300 * MS + q.window, q, 0)),
            300 * MS + q.window
        );
    }

    #[test]
    fn queue_grants_paced_future_slots_in_fifo_order_within_max_wait() {
        let q = quota(50);
        let (t, tol) = (q.spacing(), q.pacing_tolerance());
        assert_eq!(tol, 2 * t);
        let mut b = Bucket::default();
        let max_wait = 2 * SEC;
        // A burst up to capacity passes at once.
        for _ in 0..50 {
            assert_eq!(admitted(b.acquire(0, q, max_wait)), 0);
        }
        // Then the bucket is dry: the next slots open one window later, as a paced stream
        // (three at once, within the tolerance, then one per spacing).
        let slots: Vec<Nanos> = (0..6)
            .map(|_| admitted(b.acquire(MS, q, max_wait)))
            .collect();
        let w = q.window;
        assert_eq!(slots, [w, w, w, w + t, w + 2 * t, w + 3 * t]);
    }

    #[test]
    fn pacing_ends_once_the_bucket_was_idle_for_a_window() {
        let q = quota(50);
        let mut b = Bucket::default();
        for _ in 0..50 {
            admitted(b.acquire(0, q, 0));
        }
        // Demand goes on while the bucket is dry.
        assert!(matches!(b.acquire(500 * MS, q, 0), Decision::Deny { .. }));
        // Every token is back at one window, but a paced bucket lets only a few go at once.
        let back = q.window + MS;
        let passed = (0..50)
            .filter(|_| matches!(b.acquire(back, q, 0), Decision::Admit { .. }))
            .count();
        assert_eq!(passed, 3);
        // After a quiet window the full burst is available again.
        let later = 500 * MS + 2 * q.window;
        let passed = (0..50)
            .filter(|_| matches!(b.acquire(later, q, 0), Decision::Admit { .. }))
            .count();
        assert_eq!(passed, 50);
    }

    #[test]
    fn paced_bucket_still_serves_small_bursts_under_the_rate() {
        let q = quota(50);
        let mut b = Bucket::default();
        let mut now = 0;
        for _ in 0..51 {
            b.acquire(now, q, 0);
        }
        // 40 requests per second in bursts of three: under the rate, so none is refused.
        now = 2 * q.window;
        for _ in 0..40 {
            for _ in 0..3 {
                assert!(
                    matches!(b.acquire(now, q, 0), Decision::Admit { .. }),
                    "refused at {now}"
                );
            }
            now += 75 * MS;
        }
    }

    #[test]
    fn released_slot_is_reused() {
        let q = quota(1);
        let mut b = Bucket::default();
        let max_wait = 3 * SEC / 2;
        admitted(b.acquire(0, q, max_wait));
        let waiter = admitted(b.acquire(100 * MS, q, max_wait));
        assert_eq!(waiter, q.window);
        // A third request would need 2 windows: too long.
        assert!(matches!(
            b.acquire(200 * MS, q, max_wait),
            Decision::Deny { .. }
        ));
        b.release(waiter);
        assert_eq!(admitted(b.acquire(300 * MS, q, max_wait)), q.window);
    }

    /// The guarantee: however requests arrive, no window of length `window` holds more than
    /// `capacity` admissions, and sustained demand is served at `capacity` per window.
    #[test]
    fn no_window_holds_more_than_capacity() {
        let q = quota(50);
        let mut b = Bucket::default();
        let mut admitted_at = Vec::new();
        // A request every 3 ms for 10 s, queueing up to 1 s.
        let mut now = 0;
        while now < 10 * SEC {
            if let Decision::Admit { at, .. } = b.acquire(now, q, SEC) {
                admitted_at.push(at);
            }
            now += 3 * MS;
        }
        admitted_at.sort_unstable();
        for (i, &start) in admitted_at.iter().enumerate() {
            let in_window = admitted_at[i..]
                .iter()
                .take_while(|&&t| t < start + q.window)
                .count();
            assert!(
                in_window <= 50,
                "{in_window} admissions in the window at {start}"
            );
        }
        // Sustained rate: 50 per 1.05 s, in every 2-second stretch after the opening burst.
        for start in (2..8).map(|s| s * SEC + 137 * MS) {
            let n = admitted_at
                .iter()
                .filter(|&&t| t >= start && t < start + 2 * SEC)
                .count();
            assert!(n >= 94, "{n} admitted in the 2 s from {start}");
        }
    }

    #[test]
    fn paused_bucket_admits_nothing_until_the_pause_ends() {
        let q = quota(50);
        let mut b = Bucket::default();
        admitted(b.acquire(0, q, 0));
        assert!(b.pause(10 * MS, 1010 * MS));
        assert!(
            !b.pause(20 * MS, 500 * MS),
            "already paused; the longer pause stands"
        );
        assert_eq!(
            b.acquire(30 * MS, q, 0),
            Decision::Deny {
                in_window: 1,
                next_free: 1010 * MS
            }
        );
        assert!(!b.is_idle(1000 * MS, q));
        // Queued requests wait for the end of the pause.
        assert_eq!(admitted(b.acquire(40 * MS, q, SEC)), 1010 * MS);
        assert_eq!(admitted(b.acquire(1020 * MS, q, 0)), 1020 * MS);
    }

    #[test]
    fn a_departed_waiters_slot_goes_to_the_next_request() {
        let q = quota(1);
        let mut b = Bucket::default();
        let max_wait = 5 * SEC;
        admitted(b.acquire(0, q, max_wait));
        let first = admitted(b.acquire(MS, q, max_wait));
        let second = admitted(b.acquire(MS, q, max_wait));
        assert_eq!((first, second), (q.window, 2 * q.window));
        // The first waiter leaves; its turn is not lost behind the second.
        b.release(first);
        assert_eq!(admitted(b.acquire(2 * MS, q, max_wait)), q.window);
        // Nothing left to reuse: the next one queues at the back.
        assert_eq!(admitted(b.acquire(3 * MS, q, max_wait)), 3 * q.window);
    }

    #[test]
    fn restamp_moves_a_token_only_where_it_fits() {
        let q = quota(2);
        let mut b = Bucket::default();
        admitted(b.acquire(0, q, 0));
        admitted(b.acquire(0, q, 0));
        // Sent 100 ms late: moving the stamp keeps every window at 2.
        assert!(b.restamp(0, 100 * MS, q));
        // Queue two more behind the window.
        let max_wait = 3 * SEC;
        let a = admitted(b.acquire(200 * MS, q, max_wait));
        let c = admitted(b.acquire(200 * MS, q, max_wait));
        assert_eq!((a, c), (q.window, 100 * MS + q.window));
        // The stamp still at 0, moved to 200 ms, would put three stamps (100 ms, 200 ms, 1.05 s)
        // within one window.
        assert!(!b.restamp(0, 200 * MS, q));
        assert_eq!(b.held(), 4);
    }

    #[test]
    fn restamp_takes_an_expired_token_anew_but_not_during_a_pause() {
        let q = quota(2);
        let mut b = Bucket::default();
        admitted(b.acquire(0, q, 0));
        // The request waited 3 s for a connection: its stamp expired long ago.
        assert!(b.restamp(0, 3 * SEC, q));
        assert_eq!(b.held(), 1);
        b.pause(3 * SEC, 4 * SEC);
        assert!(
            !b.restamp(3 * SEC, 3 * SEC + 100 * MS, q),
            "paused: nothing leaves"
        );
    }

    #[test]
    fn bucket_is_idle_once_every_token_refilled() {
        let q = quota(3);
        let mut b = Bucket::default();
        admitted(b.acquire(0, q, 0));
        admitted(b.acquire(10 * MS, q, 0));
        assert!(!b.is_idle(q.window, q));
        assert!(b.is_idle(10 * MS + q.window, q));
    }

    #[test]
    fn remaining_and_next_free_are_consistent() {
        let q = quota(2);
        let mut b = Bucket::default();
        match b.acquire(0, q, 0) {
            Decision::Admit {
                remaining,
                next_free,
                ..
            } => {
                assert_eq!(remaining, 1);
                assert_eq!(next_free, 0);
            }
            d => panic!("{d:?}"),
        }
        match b.acquire(5 * MS, q, 0) {
            Decision::Admit {
                remaining,
                next_free,
                ..
            } => {
                assert_eq!(remaining, 0);
                assert_eq!(next_free, q.window);
            }
            d => panic!("{d:?}"),
        }
    }

    /// Any random sequence of acquires (now and queued), releases, restamps and pauses keeps
    /// every window at or under capacity, and a bucket that is neither paced nor paused and holds
    /// a token never refuses a request.
    #[test]
    fn property_the_window_holds_and_a_free_token_is_never_refused() {
        for_each_seed("bucket window", 0..300, |seed| {
            let mut rng = Rng(seed);
            let q = quota(1 + rng.below(8) as u32);
            let mut b = Bucket::default();
            let mut now: Nanos = 0;
            let mut granted: Vec<Nanos> = Vec::new();
            let mut log = Vec::new();
            for _ in 0..400 {
                match rng.below(10) {
                    0..=3 => {
                        let max_wait = [0, 0, 300 * MS, 2 * SEC][rng.below(4) as usize];
                        let free = b.pace.is_none()
                            && !b.is_paused(now)
                            && b.spent.iter().filter(|&&t| t + q.window > now).count()
                                < q.capacity as usize
                            && b.spent.last().is_none_or(|&last| last <= now);
                        let quick = b.quick_deny(now, q, max_wait);
                        let before = b.clone();
                        let decision = b.acquire(now, q, max_wait);
                        log.push(format!("acquire({now}, {max_wait}) = {decision:?}"));
                        // A refusal under the read lock is one the slow path gives too, and
                        // names no later time than it (it is the slot as of the last change).
                        if let Some(Decision::Deny { next_free, .. }) = quick {
                            assert_eq!(
                                before.quick(q).is_paused(now),
                                b.is_paused(now),
                                "seed {seed}: the reason of a quick refusal: {log:#?}"
                            );
                            assert!(
                                matches!(decision, Decision::Deny { next_free: slow, .. } if slow >= next_free),
                                "seed {seed}: quick refusal {quick:?}, slow {decision:?} from {before:?}, quota {q:?}: {:#?}",
                                &log[log.len().saturating_sub(6)..]
                            );
                        }
                        match decision {
                            Decision::Admit { at, .. } => {
                                // A stamp within CLOCK_SKEW ahead counts as the present, so
                                // a turn may come that much past `max_wait` (seed
                                // 1796167054715744758: a queued turn at the end of a pause).
                                assert!(
                                    at >= now && at - now <= max_wait + CLOCK_SKEW,
                                    "seed {seed}: {log:#?}"
                                );
                                if free {
                                    assert!(at - now <= CLOCK_SKEW, "seed {seed}: {log:#?}");
                                }
                                granted.push(at);
                            }
                            Decision::Deny { .. } => {
                                assert!(!free, "seed {seed}: refused a free token: {log:#?}")
                            }
                        }
                    }
                    4 if !granted.is_empty() => {
                        let at = granted.swap_remove(rng.below(granted.len() as u64) as usize);
                        log.push(format!("release({at})"));
                        b.release(at);
                    }
                    5 if !granted.is_empty() => {
                        let i = rng.below(granted.len() as u64) as usize;
                        let old = granted[i];
                        let to = now.max(old);
                        let moved = b.restamp(old, to, q);
                        log.push(format!("restamp({old} -> {to}) = {moved}"));
                        if moved {
                            granted[i] = to;
                        }
                    }
                    6 => {
                        let until = now + rng.below(3 * SEC);
                        log.push(format!("pause({now}, {until})"));
                        b.pause(now, until);
                    }
                    _ => now += rng.below(400 * MS),
                }
                // The log itself: any capacity + 1 consecutive stamps span at least a window.
                let cap = q.capacity as usize;
                for pair in b.spent.windows(cap + 1) {
                    assert!(
                        pair[cap] - pair[0] >= q.window,
                        "seed {seed}: {} stamps within a window: {log:#?}",
                        cap + 1
                    );
                }
            }
        });
    }
}
