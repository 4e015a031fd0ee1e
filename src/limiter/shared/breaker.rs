//! The breaker in front of Redis. After [`FAILURES_TO_OPEN`] failed or timed-out calls in a row
//! the shared budget stops asking Redis and each replica keeps its local share; a probe closes the
//! breaker again once Redis answers. Pure state: time is passed in.

use std::time::Duration;

use tokio::time::Instant;

/// Failed calls in a row that open the breaker.
pub(super) const FAILURES_TO_OPEN: u32 = 3;

/// What a call's outcome changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Transition {
    None,
    /// Redis is given up on: the budget is local from now.
    Opened,
    /// Redis answers again: the budget is shared again.
    Closed,
}

#[derive(Debug)]
pub(super) struct Breaker {
    failures: u32,
    open: bool,
    /// When the current run of failures began: the local share admits nothing until a window
    /// after it, so the admissions other replicas made through Redis have expired.
    streak_since: Option<Instant>,
}

impl Breaker {
    /// A closed breaker: Redis is tried first.
    pub(super) fn new() -> Self {
        Self {
            failures: 0,
            open: false,
            streak_since: None,
        }
    }

    pub(super) fn is_open(&self) -> bool {
        self.open
    }

    /// The last call failed (the breaker may not be open yet).
    pub(super) fn is_failing(&self) -> bool {
        self.streak_since.is_some()
    }

    /// A call answered.
    pub(super) fn success(&mut self) -> Transition {
        self.failures = 0;
        self.streak_since = None;
        if std::mem::replace(&mut self.open, false) {
            Transition::Closed
        } else {
            Transition::None
        }
    }

    /// A call failed or timed out at `now`.
    pub(super) fn failure(&mut self, now: Instant) -> Transition {
        self.failures = self.failures.saturating_add(1);
        self.streak_since.get_or_insert(now);
        if !self.open && self.failures >= FAILURES_TO_OPEN {
            self.open = true;
            return Transition::Opened;
        }
        Transition::None
    }

    /// Until when the local share must admit nothing (a `window` after the failures began), if
    /// Redis is failing now.
    pub(super) fn local_from(&self, window: Duration) -> Option<Instant> {
        self.streak_since.map(|since| since + window)
    }
}

impl Default for Breaker {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn opens_after_three_failures_in_a_row_and_closes_on_an_answer() {
        let mut b = Breaker::new();
        let t0 = Instant::now();
        assert_eq!(b.failure(t0), Transition::None);
        assert_eq!(b.success(), Transition::None);
        assert_eq!(b.local_from(Duration::from_secs(1)), None);
        let t1 = t0 + Duration::from_millis(10);
        assert_eq!(b.failure(t1), Transition::None);
        assert_eq!(b.failure(t1 + Duration::from_millis(5)), Transition::None);
        assert_eq!(b.failure(t1 + Duration::from_millis(9)), Transition::Opened);
        assert!(b.is_open());
        assert_eq!(b.failure(t1 + Duration::from_millis(20)), Transition::None);
        // The hold-off counts from the first failure of the run.
        let w = Duration::from_millis(1050);
        assert_eq!(b.local_from(w), Some(t1 + w));
        assert_eq!(b.success(), Transition::Closed);
        assert!(!b.is_open());
        assert_eq!(b.local_from(w), None);
    }
}
