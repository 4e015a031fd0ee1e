//! The pool's connection slots: at most `max_connections` held at once, and, when requests have
//! to wait for one, handed out in turn between the keys waiting, so a key with demand is never
//! starved by others, however many requests they bring. Keys the upstream has lately answered
//! with success ([`Standing::Known`]) take their turns before keys it has not: a client inventing
//! keys by the hundred queues behind every real one.
//!
//! The wait is bounded: the pool holds at most [`WAITING_PER_CONNECTION`] (64) waiting requests per
//! connection. When it is full, a request of a known key takes the place of the newest request of
//! the busiest unknown key, and any request that of a key with at least two more waiting than its
//! own (of its standing or below); the request whose place is taken is turned away with
//! [`Busy::ShareSpent`]. Otherwise the newcomer is turned away itself, [`Busy::ShareSpent`] if its
//! key already waits, [`Busy::Saturated`] if not. Either way at once, so it can be answered with
//! a TMDB body and `Retry-After` rather than after a timeout.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

/// Most requests waiting for a connection, per connection of the pool.
pub const WAITING_PER_CONNECTION: usize = 64;

/// Whose turn a waiting request takes: the key it spends, as an opaque number.
pub type Tenant = u64;

/// Whether the upstream has lately answered a key's requests with success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    Known,
    Unknown,
}

/// Why a request gets no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// The pool's waiting room is full and this request's key has its share of it.
    ShareSpent,
    /// The pool's waiting room is full.
    Saturated,
}

/// One of the pool's slots, held until dropped.
#[derive(Debug)]
pub(super) struct Slot {
    slots: Option<Arc<Slots>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(slots) = self.slots.take() {
            slots.release();
        }
    }
}

type Reply = oneshot::Sender<Result<Slot, Busy>>;

#[derive(Debug, Default)]
struct State {
    free: usize,
    /// Requests waiting, by key, oldest first.
    queues: HashMap<Tenant, VecDeque<(u64, Reply)>>,
    /// Keys with requests waiting, in the order their next turn comes: known keys, then the rest.
    turns: [VecDeque<Tenant>; 2],
    /// The standing each waiting key queued with.
    standing: HashMap<Tenant, Standing>,
    waiting: usize,
    next_id: u64,
}

impl State {
    fn queued(&self, tenant: Tenant) -> usize {
        self.queues.get(&tenant).map_or(0, VecDeque::len)
    }

    /// Whose newest waiting request a request of `tenant` (of `standing`) may take the place of
    /// in a full waiting room: a known key's takes an unknown key's, the busiest; otherwise a key
    /// with at least two more waiting than `tenant` gives way to it, never a known one to an
    /// unknown one.
    fn to_evict(&self, tenant: Tenant, standing: Standing) -> Option<Tenant> {
        let mine = self.queued(tenant);
        let busiest = |unknown_only: bool| {
            self.queues
                .iter()
                .filter(|(t, _)| !unknown_only || self.standing.get(t) == Some(&Standing::Unknown))
                .map(|(t, queue)| (queue.len(), *t))
                .max()
        };
        if standing == Standing::Known
            && let Some((_, heavy)) = busiest(true).filter(|(_, heavy)| *heavy != tenant)
        {
            return Some(heavy);
        }
        let (most, heavy) = busiest(standing == Standing::Unknown)?;
        (most > mine + 1).then_some(heavy)
    }

    /// Takes `tenant`'s newest waiting request out of the queue.
    fn evict_newest(&mut self, tenant: Tenant) -> Option<Reply> {
        let queue = self.queues.get_mut(&tenant)?;
        let (_, reply) = queue.pop_back()?;
        if queue.is_empty() {
            self.queues.remove(&tenant);
            self.drop_turn(tenant);
        }
        self.waiting -= 1;
        Some(reply)
    }

    /// The turn queue of a key of `standing`.
    fn tier(standing: Standing) -> usize {
        match standing {
            Standing::Known => 0,
            Standing::Unknown => 1,
        }
    }

    /// Takes a key with nothing waiting any more out of the turns.
    fn drop_turn(&mut self, tenant: Tenant) {
        if let Some(standing) = self.standing.remove(&tenant) {
            self.turns[Self::tier(standing)].retain(|t| *t != tenant);
        }
    }
}

/// The slots of one pool.
#[derive(Debug)]
pub(super) struct Slots {
    state: Mutex<State>,
    max_waiting: usize,
    max: usize,
}

impl Slots {
    pub(super) fn new(max_connections: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                free: max_connections,
                ..State::default()
            }),
            max_waiting: max_connections.saturating_mul(WAITING_PER_CONNECTION),
            max: max_connections,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// How many slots there are (`max_connections`).
    pub(super) fn max(&self) -> usize {
        self.max
    }

    /// Slots free now, and requests waiting for one.
    pub(super) fn load(&self) -> (usize, usize) {
        let state = self.lock();
        (state.free, state.waiting)
    }

    /// A slot for a request of `tenant`: at once if one is free and nobody waits, else in its
    /// key's turn. Dropping the future gives up the place in the queue.
    pub(super) async fn acquire(
        self: &Arc<Self>,
        tenant: Tenant,
        standing: Standing,
    ) -> Result<Slot, Busy> {
        let (id, rx) = {
            let mut state = self.lock();
            if state.free > 0 && state.waiting == 0 {
                state.free -= 1;
                return Ok(Slot {
                    slots: Some(self.clone()),
                });
            }
            if state.waiting >= self.max_waiting {
                match state.to_evict(tenant, standing) {
                    Some(heavy) => {
                        if let Some(evicted) = state.evict_newest(heavy) {
                            let _ = evicted.send(Err(Busy::ShareSpent));
                        }
                    }
                    None if state.queued(tenant) > 0 => return Err(Busy::ShareSpent),
                    None => return Err(Busy::Saturated),
                }
            }
            let (tx, rx) = oneshot::channel();
            let id = state.next_id;
            state.next_id += 1;
            state.waiting += 1;
            let queued = state.queued(tenant);
            state.queues.entry(tenant).or_default().push_back((id, tx));
            if queued == 0 {
                state.turns[State::tier(standing)].push_back(tenant);
                state.standing.insert(tenant, standing);
            }
            (id, rx)
        };
        let waiter = Waiter {
            slots: self,
            tenant,
            id,
        };
        let answer = rx.await;
        waiter.answered();
        // The sender lives in the queue until it answers, so a closed channel cannot happen;
        // it would be answered as a full pool rather than trusted.
        answer.unwrap_or(Err(Busy::Saturated))
    }

    /// A slot comes back: the next key in turn gets it (a known key's turn first), or it is free.
    fn release(self: &Arc<Self>) {
        let mut state = self.lock();
        while let Some((tier, tenant)) =
            (0..2).find_map(|tier| state.turns[tier].pop_front().map(|tenant| (tier, tenant)))
        {
            let Some(queue) = state.queues.get_mut(&tenant) else {
                state.standing.remove(&tenant);
                continue;
            };
            let Some((_, reply)) = queue.pop_front() else {
                state.queues.remove(&tenant);
                state.standing.remove(&tenant);
                continue;
            };
            if queue.is_empty() {
                state.queues.remove(&tenant);
                state.standing.remove(&tenant);
            } else {
                state.turns[tier].push_back(tenant);
            }
            state.waiting -= 1;
            let slot = Slot {
                slots: Some(self.clone()),
            };
            match reply.send(Ok(slot)) {
                Ok(()) => return,
                // Its waiter went away meanwhile: the next one in turn gets the slot.
                Err(unused) => {
                    if let Ok(mut slot) = unused {
                        slot.slots = None;
                    }
                }
            }
        }
        state.free += 1;
    }

    /// Removes a waiter that gave up, if it is still queued.
    fn forget(&self, tenant: Tenant, id: u64) {
        let mut state = self.lock();
        let Some(queue) = state.queues.get_mut(&tenant) else {
            return;
        };
        let before = queue.len();
        queue.retain(|(queued, _)| *queued != id);
        let (removed, empty) = (queue.len() < before, queue.is_empty());
        if removed {
            state.waiting -= 1;
        }
        if empty {
            state.queues.remove(&tenant);
            state.drop_turn(tenant);
        }
    }
}

/// A request's place in the queue, given up if it is dropped before it is answered.
struct Waiter<'a> {
    slots: &'a Slots,
    tenant: Tenant,
    id: u64,
}

impl Waiter<'_> {
    fn answered(self) {
        std::mem::forget(self);
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.slots.forget(self.tenant, self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    /// Queues a request of `tenant`; its answer (tenant, slot or busy) arrives on `done`.
    fn wait(
        slots: &Arc<Slots>,
        tenant: Tenant,
        done: &mpsc::UnboundedSender<(Tenant, Result<Slot, Busy>)>,
    ) {
        wait_as(slots, tenant, Standing::Known, done);
    }

    fn wait_as(
        slots: &Arc<Slots>,
        tenant: Tenant,
        standing: Standing,
        done: &mpsc::UnboundedSender<(Tenant, Result<Slot, Busy>)>,
    ) {
        let (slots, done) = (slots.clone(), done.clone());
        tokio::spawn(async move {
            let answer = slots.acquire(tenant, standing).await;
            let _ = done.send((tenant, answer));
        });
    }

    #[tokio::test]
    async fn waiting_keys_take_turns() {
        let slots = Slots::new(1);
        let held = slots.acquire(9, Standing::Known).await.unwrap();
        let (done, mut answers) = mpsc::unbounded_channel();
        // Key 1 queues three requests before key 2 queues one: key 2 is served second.
        for tenant in [1, 1, 1, 2] {
            wait(&slots, tenant, &done);
            tokio::task::yield_now().await;
        }
        assert_eq!(slots.load(), (0, 4));
        drop(held);
        let mut order = Vec::new();
        for _ in 0..4 {
            let (tenant, slot) = answers.recv().await.unwrap();
            order.push(tenant);
            drop(slot.unwrap());
        }
        assert_eq!(order, [1, 2, 1, 1]);
        assert_eq!(slots.load(), (1, 0));
    }

    #[tokio::test]
    async fn known_keys_take_their_turns_before_unknown_ones() {
        let slots = Slots::new(1);
        let held = slots.acquire(9, Standing::Known).await.unwrap();
        let (done, mut answers) = mpsc::unbounded_channel();
        // Fifty invented keys queue first; then a known one.
        for tenant in 100..150 {
            wait_as(&slots, tenant, Standing::Unknown, &done);
            tokio::task::yield_now().await;
        }
        wait_as(&slots, 1, Standing::Known, &done);
        tokio::task::yield_now().await;
        drop(held);
        let (tenant, slot) = answers.recv().await.unwrap();
        assert_eq!(tenant, 1);
        drop(slot.unwrap());
        let (tenant, _) = answers.recv().await.unwrap();
        assert_eq!(tenant, 100);
    }

    #[tokio::test]
    async fn a_full_waiting_room_makes_room_for_a_lighter_key() {
        let slots = Slots::new(1);
        let _held = slots.acquire(9, Standing::Known).await.unwrap();
        let (done, mut answers) = mpsc::unbounded_channel();
        // Key 1 fills the waiting room (64 places for one connection).
        for _ in 0..WAITING_PER_CONNECTION {
            wait(&slots, 1, &done);
            tokio::task::yield_now().await;
        }
        assert_eq!(
            slots.acquire(1, Standing::Known).await.unwrap_err(),
            Busy::ShareSpent
        );
        // Key 2 takes the place of key 1's newest, which is turned away.
        wait(&slots, 2, &done);
        tokio::task::yield_now().await;
        let (tenant, answer) = answers.recv().await.unwrap();
        assert_eq!((tenant, answer.unwrap_err()), (1, Busy::ShareSpent));
        assert_eq!(slots.load(), (0, WAITING_PER_CONNECTION));
    }

    #[tokio::test]
    async fn a_room_full_of_equals_is_saturated() {
        let slots = Slots::new(1);
        let _held = slots.acquire(9, Standing::Known).await.unwrap();
        let (done, _answers) = mpsc::unbounded_channel();
        for tenant in 0..WAITING_PER_CONNECTION as u64 {
            wait(&slots, 100 + tenant, &done);
            tokio::task::yield_now().await;
        }
        assert_eq!(
            slots.acquire(7, Standing::Known).await.unwrap_err(),
            Busy::Saturated
        );
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_leaves_its_place() {
        let slots = Slots::new(1);
        let held = slots.acquire(9, Standing::Known).await.unwrap();
        let leaving = {
            let slots = slots.clone();
            tokio::spawn(async move { slots.acquire(7, Standing::Known).await })
        };
        tokio::task::yield_now().await;
        assert_eq!(slots.load(), (0, 1));
        leaving.abort();
        let _ = leaving.await;
        assert_eq!(slots.load(), (0, 0));
        drop(held);
        assert_eq!(slots.load(), (1, 0));
    }
}
