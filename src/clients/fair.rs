//! Fair shares of one key's budget between the apps sent with it.
//!
//! The budget still decides how many requests of the key may leave and when (its window
//! guarantee is untouched); a [`Lane`] decides only *which app's* request gets each token while
//! the key is saturated.
//!
//! # Queue mode
//! While nothing of the key waits, a request takes a free token at once, as without apps. Once
//! one must wait, requests of the key's apps queue in the lane, one queue per app, and a driver
//! task takes the key's tokens one at a time: it reserves the key's next slot, sleeps until it,
//! and only then hands the token to the request next in the lane's order, so a request that
//! arrived during the sleep can still be first. The order:
//! - `interactive` apps before `batch` apps, except that a waiting `batch` app gets at least one
//!   turn in [`BATCH_FLOOR_EVERY`] (5% of the key's rate) so it never starves;
//! - within a priority, start-time fair queueing by `share`: each app has a virtual finish tag
//!   that grows by `1/share` per token, the lowest tag goes first, and an app that had nothing
//!   waiting starts at the lane's current tag, so idleness banks no credit. Apps that ask less
//!   than their share leave the rest to the others (work-conserving);
//! - an app at its own `requests_per_second` cap is passed over until its cap has room.
//!
//! # Reject mode
//! Nothing queues, so shares are kept by refusing: once the key has at most a tenth of its
//! tokens left (it is saturated), a `batch` app is refused while an `interactive` app of the key
//! was active within the window (beyond its floor of 5%), and an app that took its share of the
//! window already (its share of the apps active in the window) is refused, leaving the last
//! tokens to the others.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, oneshot, watch};
use tokio::time::Instant;

use crate::config::Priority;
use crate::limiter::{Budget, Grant, Key, Reason, Refusal};

/// A waiting `batch` app gets at least one turn in this many while `interactive` apps take the
/// rest: 5% of the key's rate.
pub const BATCH_FLOOR_EVERY: u32 = 20;

/// A virtual-time unit: one token of an app with share 1.
const STRIDE: u64 = 1 << 32;

/// An app's place in a lane.
#[derive(Debug, Clone)]
pub struct Member {
    pub share: u32,
    pub priority: Priority,
    /// Its own ceiling per window, if any.
    pub cap: Option<u32>,
}

/// The apps of one key, and who is next.
#[derive(Debug)]
pub struct Lane {
    key: Key,
    members: Vec<Member>,
    /// The window shares and caps are counted over (one second and the margin).
    window: Duration,
    state: Mutex<State>,
    /// The last waiter left: a driver holding a reserved slot gives it back.
    emptied: Notify,
}

#[derive(Debug)]
struct State {
    driving: bool,
    apps: Vec<AppState>,
    /// The start tag of the last token handed out.
    vclock: u64,
    /// Interactive turns in a row while a batch app waited.
    interactive_run: u32,
    next_id: u64,
}

#[derive(Debug, Default)]
struct AppState {
    queue: VecDeque<Waiter>,
    finish: u64,
    /// When the app was handed each token within the window.
    used: VecDeque<Instant>,
    /// When the app last asked (reject mode: who is active).
    seen: Option<Instant>,
}

#[derive(Debug)]
struct Waiter {
    id: u64,
    tx: oneshot::Sender<Turn>,
}

/// What the lane hands a waiting request.
#[derive(Debug)]
enum Turn {
    Go(Grant),
    Refused(Refusal),
}

impl Lane {
    pub fn new(key: Key, members: Vec<Member>, window: Duration) -> Self {
        let apps = members.iter().map(|_| AppState::default()).collect();
        Self {
            key,
            members,
            window,
            state: Mutex::new(State {
                driving: false,
                apps,
                vclock: 0,
                interactive_run: 0,
                next_id: 0,
            }),
            emptied: Notify::new(),
        }
    }

    /// Requests of the app at `index` waiting for their turn now.
    pub fn queued(&self, index: usize) -> usize {
        self.lock().apps.get(index).map_or(0, |app| app.queue.len())
    }

    /// The app at `index`'s own ceiling per second, if it has one.
    pub fn cap(&self, index: usize) -> Option<u32> {
        self.members.get(index).and_then(|member| member.cap)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue mode: a token for a request of app `app`, in the lane's order, by `until` at the
    /// latest (its `max_wait`, or the drain's deadline once `drained` names one).
    pub async fn turn(
        self: &Arc<Self>,
        app: usize,
        budget: &Arc<dyn Budget>,
        max_wait: Duration,
        until: Instant,
        drained: &mut watch::Receiver<Option<Instant>>,
    ) -> Result<Grant, Refusal> {
        let now = Instant::now();
        let idle = {
            let mut st = self.lock();
            st.apps[app].seen = Some(now);
            !st.driving && st.apps.iter().all(|a| a.queue.is_empty())
        };
        if idle && self.cap_room(app, now) {
            // Nothing waits: a free token is taken at once, as without apps.
            if let Ok(grant) = budget.acquire(self.key, now, Duration::ZERO).await {
                if grant.at <= now && !grant.pending {
                    self.lock().note_use(app, now, self.window);
                    return Ok(grant);
                }
                budget.release(&grant);
            }
        }
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut st = self.lock();
            // More waiting than the key could serve within `max_wait` will not be served in
            // time: refused now rather than after the wait.
            let limit = budget.peek(self.key, now).limit;
            let most = u128::from(limit) * max_wait.as_millis() / 1000 + 1;
            if st.apps[app].queue.len() as u128 >= most {
                let wait = Duration::from_secs(1);
                return Err(Refusal::new(Reason::KeyOverLimit, limit, limit, wait));
            }
            let id = st.next_id;
            st.next_id += 1;
            let vclock = st.vclock;
            let me = &mut st.apps[app];
            if me.queue.is_empty() {
                me.finish = me.finish.max(vclock);
            }
            me.queue.push_back(Waiter { id, tx });
            if !st.driving {
                st.driving = true;
                tokio::spawn(drive(self.clone(), budget.clone(), max_wait));
            }
            id
        };
        let mut waiting = Waiting {
            lane: self,
            budget: &**budget,
            app,
            id,
            rx,
        };
        let drain = *drained.borrow_and_update();
        let mut until = drain.map_or(until, |deadline| until.min(deadline));
        let turn = loop {
            tokio::select! {
                turn = &mut waiting.rx => break turn.ok(),
                () = tokio::time::sleep_until(until) => {
                    // A turn handed over just now still counts.
                    break waiting.rx.try_recv().ok();
                }
                changed = drained.changed() => {
                    match (changed, *drained.borrow_and_update()) {
                        (Ok(()), Some(deadline)) => until = until.min(deadline),
                        (Ok(()), None) => {}
                        (Err(_), _) => until = Instant::now(),
                    }
                }
            }
        };
        match turn {
            Some(Turn::Go(grant)) => {
                waiting.id = u64::MAX;
                Ok(grant)
            }
            Some(Turn::Refused(refusal)) => Err(refusal),
            None => {
                let rate = budget.peek(self.key, Instant::now());
                let wait = rate.reset_after.max(Duration::from_millis(1));
                let reason = match drained.borrow().is_some() {
                    true => Reason::Draining,
                    false => Reason::KeyOverLimit,
                };
                Err(Refusal::new(reason, rate.limit, rate.limit, wait))
            }
        }
    }

    /// Reject mode: whether a request of `app` may try for a token now (see the module doc).
    /// `limit` and `remaining` are the key's standing.
    pub fn check(
        &self,
        app: usize,
        limit: u32,
        remaining: u32,
        now: Instant,
    ) -> Result<(), Refusal> {
        let mut st = self.lock();
        st.apps[app].seen = Some(now);
        let window = self.window;
        let cutoff = now.checked_sub(window);
        for state in &mut st.apps {
            state.forget_before(cutoff);
        }
        let used = st.apps[app].used.len() as u64;
        let retry = st.apps[app]
            .used
            .front()
            .map_or(Duration::from_millis(1), |first| {
                (*first + window).saturating_duration_since(now)
            })
            .max(Duration::from_millis(1));
        let refuse = |reason| Err(Refusal::new(reason, limit, limit, retry));
        if let Some(cap) = self.members[app].cap
            && used >= u64::from(cap)
        {
            return refuse(Reason::AppCap);
        }
        if remaining > (limit / 10).max(1) {
            return Ok(());
        }
        let active = |i: usize| {
            i == app
                || st.apps[i]
                    .seen
                    .is_some_and(|seen| cutoff.is_none_or(|c| seen > c))
        };
        let me = &self.members[app];
        let interactive_active = (0..self.members.len())
            .any(|i| i != app && active(i) && self.members[i].priority == Priority::Interactive);
        if me.priority == Priority::Batch && interactive_active {
            return match used * u64::from(BATCH_FLOOR_EVERY) < u64::from(limit) {
                true => Ok(()),
                false => refuse(Reason::AppShare),
            };
        }
        let (mut shares, mut interactive_used) = (0u64, 0u64);
        for (i, member) in self.members.iter().enumerate() {
            if !active(i) {
                continue;
            }
            if member.priority == me.priority {
                shares += u64::from(member.share);
            }
            if member.priority == Priority::Interactive {
                interactive_used += st.apps[i].used.len() as u64;
            }
        }
        let class = match me.priority {
            Priority::Interactive => u64::from(limit),
            Priority::Batch => u64::from(limit).saturating_sub(interactive_used),
        };
        // used < class * share / shares, in whole numbers.
        match used * shares.max(1) < class * u64::from(me.share) {
            true => Ok(()),
            false => refuse(Reason::AppShare),
        }
    }

    /// Reject mode: a request of `app` took a token at `now`.
    pub fn note_use(&self, app: usize, now: Instant) {
        self.lock().note_use(app, now, self.window);
    }

    /// Whether `app` is under its own cap at `now`.
    fn cap_room(&self, app: usize, now: Instant) -> bool {
        let mut st = self.lock();
        st.apps[app].forget_before(now.checked_sub(self.window));
        self.members[app]
            .cap
            .is_none_or(|cap| st.apps[app].used.len() < cap as usize)
    }

    /// Gives `grant` to the request next in order; hands it back if none is waiting.
    fn hand_out(&self, mut grant: Grant, now: Instant) -> Option<Grant> {
        let mut st = self.lock();
        while let Some(app) = st.pick(&self.members, now, self.window) {
            let Some(waiter) = st.apps[app].queue.pop_front() else {
                continue;
            };
            match waiter.tx.send(Turn::Go(grant)) {
                Ok(()) => {
                    st.note_use(app, now, self.window);
                    return None;
                }
                Err(Turn::Go(back)) => grant = back,
                Err(Turn::Refused(_)) => return None,
            }
        }
        Some(grant)
    }

    /// Nothing can be admitted within the wait (the key paused for long, the table full):
    /// every waiter is told so now rather than at its deadline.
    fn refuse_all(&self, refusal: Refusal) {
        let mut st = self.lock();
        for app in &mut st.apps {
            for waiter in app.queue.drain(..) {
                let _ = waiter.tx.send(Turn::Refused(refusal));
            }
        }
    }

    /// When the driver has someone to serve: `None` if no one waits, `now` if a waiting app has
    /// room under its cap, else when the first cap has room again.
    fn next_servable(&self, now: Instant) -> Option<Instant> {
        let mut st = self.lock();
        let cutoff = now.checked_sub(self.window);
        let mut next = None;
        for (i, app) in st.apps.iter_mut().enumerate() {
            app.queue.retain(|w| !w.tx.is_closed());
            if app.queue.is_empty() {
                continue;
            }
            app.forget_before(cutoff);
            let at = match self.members[i].cap {
                Some(cap) if app.used.len() >= cap as usize => {
                    app.used.front().map_or(now, |first| *first + self.window)
                }
                _ => now,
            };
            next = Some(next.map_or(at, |n: Instant| n.min(at)));
        }
        next
    }
}

impl State {
    fn note_use(&mut self, app: usize, now: Instant, window: Duration) {
        let me = &mut self.apps[app];
        me.forget_before(now.checked_sub(window));
        me.used.push_back(now);
        me.seen = Some(now);
    }

    /// The app whose request goes next (see the module doc), its tags moved on.
    fn pick(&mut self, members: &[Member], now: Instant, window: Duration) -> Option<usize> {
        let cutoff = now.checked_sub(window);
        let mut interactive: Option<(u64, usize)> = None;
        let mut batch: Option<(u64, usize)> = None;
        for (i, app) in self.apps.iter_mut().enumerate() {
            app.queue.retain(|w| !w.tx.is_closed());
            if app.queue.is_empty() {
                continue;
            }
            app.forget_before(cutoff);
            if members[i]
                .cap
                .is_some_and(|cap| app.used.len() >= cap as usize)
            {
                continue;
            }
            let tag = (app.finish.max(self.vclock), i);
            let best = match members[i].priority {
                Priority::Interactive => &mut interactive,
                Priority::Batch => &mut batch,
            };
            if best.is_none_or(|b| tag < b) {
                *best = Some(tag);
            }
        }
        let (tag, chosen) = match (interactive, batch) {
            (Some(_), Some(b)) if self.interactive_run + 1 >= BATCH_FLOOR_EVERY => {
                self.interactive_run = 0;
                b
            }
            (Some(i), Some(_)) => {
                self.interactive_run += 1;
                i
            }
            (Some(i), None) => i,
            (None, Some(b)) => {
                self.interactive_run = 0;
                b
            }
            (None, None) => return None,
        };
        self.vclock = tag;
        self.apps[chosen].finish = tag + STRIDE / u64::from(members[chosen].share.max(1));
        Some(chosen)
    }
}

impl AppState {
    fn forget_before(&mut self, cutoff: Option<Instant>) {
        let Some(cutoff) = cutoff else {
            return;
        };
        while self.used.front().is_some_and(|at| *at <= cutoff) {
            self.used.pop_front();
        }
    }
}

/// A request waiting in a lane: leaving (served, refused, timed out or gone) takes it out of
/// its queue, and a turn it was handed but never took goes back to the budget.
struct Waiting<'a> {
    lane: &'a Lane,
    budget: &'a dyn Budget,
    app: usize,
    /// `u64::MAX` once its turn was taken.
    id: u64,
    rx: oneshot::Receiver<Turn>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.id != u64::MAX {
            let mut st = self.lane.lock();
            st.apps[self.app].queue.retain(|w| w.id != self.id);
            let empty = st.apps.iter().all(|a| a.queue.is_empty());
            drop(st);
            if empty {
                self.lane.emptied.notify_one();
            }
        }
        // A turn handed over as the request went away goes back to the budget.
        self.rx.close();
        if let Ok(Turn::Go(grant)) = self.rx.try_recv() {
            self.budget.release(&grant);
        }
    }
}

/// Takes the key's tokens one at a time while anyone waits in the lane, each handed out at its
/// slot to the request next in order.
async fn drive(lane: Arc<Lane>, budget: Arc<dyn Budget>, max_wait: Duration) {
    'tokens: loop {
        let now = Instant::now();
        let Some(servable) = lane.next_servable(now) else {
            let mut st = lane.lock();
            // A request may have queued since the look: it is served by this driver.
            if st.apps.iter().all(|a| a.queue.is_empty()) {
                st.driving = false;
                return;
            }
            continue;
        };
        if servable > now {
            tokio::select! {
                () = tokio::time::sleep_until(servable) => {}
                () = lane.emptied.notified() => {}
            }
            continue;
        }
        let mut grant = match budget.acquire(lane.key, now, max_wait).await {
            Ok(grant) => grant,
            Err(refusal) => {
                lane.refuse_all(refusal);
                continue;
            }
        };
        loop {
            let now = Instant::now();
            if grant.at <= now && !grant.pending {
                break;
            }
            if grant.at > now {
                tokio::select! {
                    () = tokio::time::sleep_until(grant.at) => {}
                    () = lane.emptied.notified() => {
                        if lane.next_servable(Instant::now()).is_none() {
                            budget.release(&grant);
                            continue 'tokens;
                        }
                        continue;
                    }
                }
            }
            match budget.resume(&mut grant, Instant::now(), max_wait).await {
                Ok(()) => {}
                // Paused by an upstream 429 meanwhile: the next token is after the pause.
                Err(refusal) if refusal.reason == Reason::Paused => {
                    budget.release(&grant);
                    continue 'tokens;
                }
                Err(refusal) => {
                    budget.release(&grant);
                    lane.refuse_all(refusal);
                    continue 'tokens;
                }
            }
        }
        if let Some(unused) = lane.hand_out(grant, Instant::now()) {
            budget.release(&unused);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(spec: &[(u32, Priority)]) -> Vec<Member> {
        spec.iter()
            .map(|(share, priority)| Member {
                share: *share,
                priority: *priority,
                cap: None,
            })
            .collect()
    }

    fn backlogged(spec: &[(u32, Priority)]) -> (State, Vec<Member>, Vec<oneshot::Receiver<Turn>>) {
        let members = members(spec);
        let mut st = State {
            driving: true,
            apps: members.iter().map(|_| AppState::default()).collect(),
            vclock: 0,
            interactive_run: 0,
            next_id: 0,
        };
        let mut keep = Vec::new();
        for app in &mut st.apps {
            for id in 0..10_000 {
                let (tx, rx) = oneshot::channel();
                app.queue.push_back(Waiter { id, tx });
                keep.push(rx);
            }
        }
        (st, members, keep)
    }

    fn turns(st: &mut State, members: &[Member], n: usize) -> Vec<usize> {
        let mut counts = vec![0; members.len()];
        // Far apart, so no cap or window is involved.
        let now = Instant::now();
        for _ in 0..n {
            let app = st.pick(members, now, Duration::from_millis(1050)).unwrap();
            st.apps[app].queue.pop_front();
            counts[app] += 1;
        }
        counts
    }

    #[test]
    fn backlogged_apps_get_turns_in_proportion_to_their_shares() {
        use Priority::Interactive as I;
        let (mut st, members, _keep) = backlogged(&[(3, I), (1, I)]);
        assert_eq!(turns(&mut st, &members, 400), vec![300, 100]);
        let (mut st, members, _keep) = backlogged(&[(5, I), (2, I), (1, I)]);
        assert_eq!(turns(&mut st, &members, 800), vec![500, 200, 100]);
    }

    #[test]
    fn interactive_goes_first_and_batch_keeps_its_floor() {
        use Priority::{Batch as B, Interactive as I};
        let (mut st, members, _keep) = backlogged(&[(1, B), (1, I)]);
        let counts = turns(&mut st, &members, 1000);
        assert_eq!(
            counts,
            vec![50, 950],
            "one turn in {BATCH_FLOOR_EVERY} for batch"
        );
    }

    #[test]
    fn an_app_that_was_idle_banks_no_credit() {
        use Priority::Interactive as I;
        let (mut st, members, _keep) = backlogged(&[(1, I), (1, I)]);
        let waiting = std::mem::take(&mut st.apps[1].queue);
        assert_eq!(turns(&mut st, &members, 100), vec![100, 0]);
        // App 1 comes back: it starts at the lane's tag, as `turn` sets it, and alternates.
        st.apps[1].queue = waiting;
        st.apps[1].finish = st.apps[1].finish.max(st.vclock);
        assert_eq!(turns(&mut st, &members, 100), vec![50, 50]);
    }

    #[test]
    fn reject_mode_refuses_the_app_over_its_share_once_the_key_is_saturated() {
        use Priority::{Batch as B, Interactive as I};
        let window = Duration::from_millis(1050);
        let lane = Lane::new(Key::of("k"), members(&[(3, I), (1, I), (1, B)]), window);
        let now = Instant::now();
        for _ in 0..38 {
            lane.note_use(0, now);
        }
        for _ in 0..12 {
            lane.note_use(1, now);
        }
        // Not saturated: anyone may try.
        assert!(lane.check(0, 50, 20, now).is_ok());
        // Saturated: app 0 has its 3/4 of 50 (37.5), app 1 not yet its 1/4 (12.5).
        let refusal = lane.check(0, 50, 3, now).unwrap_err();
        assert_eq!(refusal.reason, Reason::AppShare);
        assert!(lane.check(1, 50, 3, now).is_ok());
        // Batch while interactive apps are active: only its floor (5% of 50 = 2.5).
        lane.note_use(2, now);
        lane.note_use(2, now);
        assert!(lane.check(2, 50, 3, now).is_ok());
        lane.note_use(2, now);
        assert_eq!(
            lane.check(2, 50, 3, now).unwrap_err().reason,
            Reason::AppShare
        );
    }
}
