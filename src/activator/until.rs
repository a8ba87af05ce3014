//! What ends a client connection besides the connection itself: the
//! activator stopping, the drain signal, and the request-head deadline.
//!
//! Why a future of its own instead of a `select!` over the cancellation
//! tokens and a `Sleep`: a connection's task is woken several times per
//! request (bytes in, the upstream's answer, bytes out), and `select!`
//! polls every branch on every wake. Polling a `CancellationToken`'s future
//! takes the lock of the token's waiter list — one list shared by every
//! connection — and hyper's own `header_read_timeout` allocates and
//! registers a fresh timer for every request head. [`Until`] polls its
//! token futures and its one timer with a waker of its own, and only when
//! that waker has fired; on any other wake it costs one atomic load. The
//! head deadline is kept lazily: the timer is armed once and, when it
//! fires, re-armed from the connection's [`Idle`] clock instead of being
//! reset on every request.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll, Wake, Waker},
    time::Duration,
};

use futures::task::AtomicWaker;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// Why [`Until`] resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Event {
    /// The activator stops: close at once.
    Stop,
    /// Draining began: shut the connection down gracefully (reported once).
    Shutdown,
    /// No request head within the deadline: close.
    Deadline,
}

/// What to do when the deadline timer fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Check {
    /// Not due yet: wait until then.
    Rearm(Instant),
    /// No deadline any more.
    Off,
    /// Due: the connection is to be closed.
    Expired,
}

/// The request-head clock of one HTTP/1.1 connection: how many requests
/// are being answered, and since when none has been. A head is due within
/// `timeout` of the connection's hand-over to hyper or of the end of the
/// previous response, as hyper's `header_read_timeout` has it.
pub(crate) struct Idle {
    origin: Instant,
    timeout: Duration,
    in_flight: AtomicUsize,
    /// Nanoseconds after `origin` at which the last response ended.
    since: AtomicU64,
}

impl Idle {
    pub(crate) fn new(timeout: Duration) -> Self {
        Self {
            origin: Instant::now(),
            timeout,
            in_flight: AtomicUsize::new(0),
            since: AtomicU64::new(0),
        }
    }

    /// Restarts the clock (the head was read before hyper took over).
    pub(crate) fn restart(&self) {
        self.mark_idle();
    }

    /// A request is being answered, until the returned guard drops (with
    /// its response body).
    pub(crate) fn busy(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Busy(self.clone())
    }

    fn mark_idle(&self) {
        let at = Instant::now().saturating_duration_since(self.origin);
        self.since.store(at.as_nanos() as u64, Ordering::Release);
    }

    /// The deadline check at `now`.
    pub(crate) fn check(&self, now: Instant) -> Check {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            // Busy: no head is owed; look again a timeout from now.
            return Check::Rearm(now + self.timeout);
        }
        let since = self.origin + Duration::from_nanos(self.since.load(Ordering::Acquire));
        let due = since + self.timeout;
        if now >= due {
            Check::Expired
        } else {
            Check::Rearm(due)
        }
    }
}

/// One request in flight on an HTTP/1.1 connection (see [`Idle::busy`]).
pub(crate) struct Busy(Arc<Idle>);

impl Drop for Busy {
    fn drop(&mut self) {
        // The time first, so that a check seeing no request in flight sees
        // when the last one ended.
        self.0.mark_idle();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Our own waker: records that one of the watched futures made progress
/// and passes the wake on to the connection's task.
#[derive(Default)]
struct Signal {
    fired: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// Resolves with the first [`Event`]; see the module docs for why it is
/// shaped this way. `check` is asked when the deadline timer fires.
pub(crate) struct Until<F> {
    signal: Arc<Signal>,
    waker: Waker,
    stop: Pin<Box<WaitForCancellationFutureOwned>>,
    shutdown: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    deadline: Option<Pin<Box<Sleep>>>,
    check: F,
}

impl<F: FnMut(Instant) -> Check + Unpin> Until<F> {
    /// Watches `stop`, `shutdown`, and a deadline first due at `first`.
    pub(crate) fn new(
        stop: &CancellationToken,
        shutdown: &CancellationToken,
        first: Instant,
        check: F,
    ) -> Self {
        let signal = Arc::new(Signal {
            // Everything is polled (and so registered) on the first poll.
            fired: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        Self {
            waker: Waker::from(signal.clone()),
            signal,
            stop: Box::pin(stop.clone().cancelled_owned()),
            shutdown: Some(Box::pin(shutdown.clone().cancelled_owned())),
            deadline: Some(Box::pin(tokio::time::sleep_until(first))),
            check,
        }
    }
}

impl<F: FnMut(Instant) -> Check + Unpin> Future for Until<F> {
    type Output = Event;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Event> {
        let this = self.get_mut();
        this.signal.task.register(cx.waker());
        if !this.signal.fired.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let mut own = Context::from_waker(&this.waker);
        if this.stop.as_mut().poll(&mut own).is_ready() {
            return Poll::Ready(Event::Stop);
        }
        if let Some(s) = this.shutdown.as_mut()
            && s.as_mut().poll(&mut own).is_ready()
        {
            this.shutdown = None;
            // The deadline was not polled (registered) this time round.
            this.signal.fired.store(true, Ordering::Release);
            return Poll::Ready(Event::Shutdown);
        }
        while let Some(d) = this.deadline.as_mut() {
            if d.as_mut().poll(&mut own).is_pending() {
                break;
            }
            match (this.check)(Instant::now()) {
                Check::Rearm(at) => d.as_mut().reset(at),
                Check::Off => this.deadline = None,
                Check::Expired => {
                    this.deadline = None;
                    return Poll::Ready(Event::Deadline);
                }
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_head_clock_runs_only_while_nothing_is_answered() {
        let idle = Arc::new(Idle::new(Duration::from_secs(10)));
        let t0 = idle.origin;
        assert_eq!(
            idle.check(t0 + Duration::from_secs(3)),
            Check::Rearm(t0 + Duration::from_secs(10))
        );
        assert_eq!(idle.check(t0 + Duration::from_secs(10)), Check::Expired);
        let busy = idle.busy();
        let later = t0 + Duration::from_secs(30);
        assert_eq!(
            idle.check(later),
            Check::Rearm(later + Duration::from_secs(10))
        );
        drop(busy);
        // The response just ended: a whole timeout again from then.
        match idle.check(Instant::now()) {
            Check::Rearm(at) => assert!(at > Instant::now() + Duration::from_secs(9)),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn events_arrive_once_each_and_the_deadline_is_rechecked() {
        let (stop, shutdown) = (CancellationToken::new(), CancellationToken::new());
        let checks = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        let until = Until::new(&stop, &shutdown, start + Duration::from_secs(1), {
            let checks = checks.clone();
            move |now| {
                // Re-armed once, then due.
                if checks.fetch_add(1, Ordering::Relaxed) == 0 {
                    Check::Rearm(now + Duration::from_secs(1))
                } else {
                    Check::Expired
                }
            }
        });
        tokio::pin!(until);
        shutdown.cancel();
        assert_eq!(until.as_mut().await, Event::Shutdown);
        assert_eq!(until.as_mut().await, Event::Deadline);
        assert_eq!(checks.load(Ordering::Relaxed), 2);
        assert!(start.elapsed() >= Duration::from_secs(2));
        stop.cancel();
        assert_eq!(until.as_mut().await, Event::Stop);
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_switched_off_never_fires() {
        let (stop, shutdown) = (CancellationToken::new(), CancellationToken::new());
        let until = Until::new(
            &stop,
            &shutdown,
            Instant::now() + Duration::from_millis(10),
            |_| Check::Off,
        );
        tokio::pin!(until);
        let r = tokio::time::timeout(Duration::from_secs(3600), until.as_mut()).await;
        assert!(r.is_err(), "{r:?}");
        stop.cancel();
        assert_eq!(until.await, Event::Stop);
    }
}
