//! The bounded FIFO of requests a route holds while its upstream cannot
//! take them.
//!
//! Each held request is one entry: its arrival number and the sender of a
//! oneshot it waits on (about a hundred bytes; the request itself stays in
//! its own task, its body unread, so HTTP flow control pushes back on the
//! client). Entries are keyed by arrival number, so a request that was
//! released, found the upstream refusing, and is held again goes back to its
//! place in the line rather than to its end. The readiness flag lives under
//! the same lock as the queue: a request never decides to wait while the
//! prober is releasing, so none is left behind.

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicUsize, Ordering},
};

use tokio::sync::oneshot;

/// What a held request is woken with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Release {
    /// The upstream accepts connections: forward now.
    Go,
    /// The activator is shutting down: answer 503 so the caller retries elsewhere.
    Drain,
}

/// The answer to "may this request go, or wait?".
#[derive(Debug)]
pub(crate) enum Admit {
    /// The upstream is ready: forward at once.
    Ready,
    /// Wait on this until released.
    Held(oneshot::Receiver<Release>),
    /// The route's queue (`max_pending`) or all queues (`max_pending_total`) are full.
    Full { total: bool },
    /// Shutting down.
    Draining,
}

/// Limits shared by every route's queue.
#[derive(Debug)]
pub(crate) struct Limits {
    pub(crate) per_route: usize,
    pub(crate) total: usize,
    /// Requests held across all routes now.
    pub(crate) held: AtomicUsize,
}

impl Limits {
    pub(crate) fn new(per_route: usize, total: usize) -> Self {
        Self {
            per_route,
            total,
            held: AtomicUsize::new(0),
        }
    }
}

/// One route's queue and readiness. Kept behind a `std::sync::Mutex`: every
/// operation is a few map steps, never held across an await.
#[derive(Debug, Default)]
pub(crate) struct HoldQueue {
    waiters: BTreeMap<u64, oneshot::Sender<Release>>,
    ready: bool,
    draining: bool,
}

impl HoldQueue {
    /// Lets request `seq` go, holds it, or refuses it. A request held again
    /// after its connection was refused (`requeue`) is never refused for
    /// space: it was admitted once and must not fail for the upstream's sake.
    pub(crate) fn admit(&mut self, seq: u64, requeue: bool, limits: &Limits) -> Admit {
        if self.draining {
            return Admit::Draining;
        }
        if self.ready {
            return Admit::Ready;
        }
        if !requeue {
            if self.waiters.len() >= limits.per_route {
                return Admit::Full { total: false };
            }
            if limits.held.fetch_add(1, Ordering::AcqRel) >= limits.total {
                limits.held.fetch_sub(1, Ordering::AcqRel);
                return Admit::Full { total: true };
            }
        } else {
            limits.held.fetch_add(1, Ordering::AcqRel);
        }
        let (tx, rx) = oneshot::channel();
        self.waiters.insert(seq, tx);
        Admit::Held(rx)
    }

    /// Marks the upstream ready and hands back every waiter, oldest first,
    /// for the caller to release outside the lock.
    pub(crate) fn set_ready(&mut self, limits: &Limits) -> Vec<oneshot::Sender<Release>> {
        self.ready = true;
        self.take_all(limits)
    }

    /// The upstream refused a connection or a probe failed: hold new requests.
    /// Returns whether it was ready before.
    pub(crate) fn set_not_ready(&mut self) -> bool {
        std::mem::replace(&mut self.ready, false)
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.ready
    }

    /// Stops admitting and hands back every waiter, oldest first.
    pub(crate) fn drain(&mut self, limits: &Limits) -> Vec<oneshot::Sender<Release>> {
        self.draining = true;
        self.take_all(limits)
    }

    /// Forgets request `seq` (it timed out or its client went away); false
    /// when it was no longer waiting.
    pub(crate) fn remove(&mut self, seq: u64, limits: &Limits) -> bool {
        let removed = self.waiters.remove(&seq).is_some();
        if removed {
            limits.held.fetch_sub(1, Ordering::AcqRel);
        }
        removed
    }

    pub(crate) fn len(&self) -> usize {
        self.waiters.len()
    }

    fn take_all(&mut self, limits: &Limits) -> Vec<oneshot::Sender<Release>> {
        let all = std::mem::take(&mut self.waiters);
        limits.held.fetch_sub(all.len(), Ordering::AcqRel);
        // BTreeMap iterates in key order: arrival order.
        all.into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(a: Admit) -> oneshot::Receiver<Release> {
        match a {
            Admit::Held(rx) => rx,
            other => panic!("expected Held, got {other:?}"),
        }
    }

    #[test]
    fn bounded_per_route_and_in_total() {
        let limits = Limits::new(2, 3);
        let (mut a, mut b) = (HoldQueue::default(), HoldQueue::default());
        let _r = [
            held(a.admit(1, false, &limits)),
            held(a.admit(2, false, &limits)),
        ];
        assert!(matches!(
            a.admit(3, false, &limits),
            Admit::Full { total: false }
        ));
        let _s = held(b.admit(1, false, &limits));
        assert!(matches!(
            b.admit(2, false, &limits),
            Admit::Full { total: true }
        ));
        assert_eq!(limits.held.load(Ordering::Acquire), 3);
        // A request held again is never refused for space.
        let _t = held(a.admit(0, true, &limits));
        assert_eq!((a.len(), limits.held.load(Ordering::Acquire)), (3, 4));
        assert!(a.remove(0, &limits));
        assert!(!a.remove(0, &limits));
        assert_eq!(limits.held.load(Ordering::Acquire), 3);
    }

    #[test]
    fn released_in_arrival_order_even_when_held_again() {
        let limits = Limits::new(10, 10);
        let mut q = HoldQueue::default();
        let mut rxs = Vec::new();
        for seq in [5, 7, 9] {
            rxs.push((seq, held(q.admit(seq, false, &limits))));
        }
        // Request 3 arrived first, was released, was refused, is held again.
        rxs.push((3, held(q.admit(3, true, &limits))));
        let order: Vec<_> = q.waiters.keys().copied().collect();
        assert_eq!(order, vec![3, 5, 7, 9]);
        let senders = q.set_ready(&limits);
        assert_eq!(senders.len(), 4);
        assert_eq!(limits.held.load(Ordering::Acquire), 0);
        assert!(matches!(q.admit(11, false, &limits), Admit::Ready));
        assert!(q.set_not_ready());
        assert!(!q.set_not_ready());
        assert!(matches!(q.admit(12, false, &limits), Admit::Held(_)));
    }

    #[test]
    fn draining_refuses_and_hands_back_everyone() {
        let limits = Limits::new(10, 10);
        let mut q = HoldQueue::default();
        let _rx = held(q.admit(1, false, &limits));
        assert_eq!(q.drain(&limits).len(), 1);
        assert!(matches!(q.admit(2, false, &limits), Admit::Draining));
        assert!(matches!(q.admit(3, true, &limits), Admit::Draining));
        assert_eq!(limits.held.load(Ordering::Acquire), 0);
    }
}
