//! Readiness by connect probing.
//!
//! A Kubernetes Service with no ready endpoints refuses connections (or, with
//! some proxies, drops them), so "a TCP connect to the upstream succeeds" is
//! a readiness signal that works for plain Deployments and StatefulSets and
//! needs no API access. While any request waits, a probe starts every
//! `probe_interval` (100 ms by default; Knative probes every 200 ms), several
//! may be in flight when connects are slow, and the newest result wins. While
//! nothing waits, the interval doubles up to `probe_max_interval`: the route's
//! state stays roughly current (so a workload woken by other means is already
//! "ready" when a request comes) for one connect every few seconds.
//!
//! A probe resolves the upstream name (through tokio's resolver threads,
//! never on a runtime worker), connects to every address at once and
//! returns those that answered; requests go to those addresses, so the
//! request path never waits on DNS.

use std::{
    io,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{FutureExt, StreamExt, stream::FuturesUnordered};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::RouteState;

/// Most probes of one route in flight at once (slow connects overlap).
const MAX_IN_FLIGHT: usize = 8;
/// Most addresses one name may resolve to that a probe tries.
const MAX_ADDRS: usize = 16;

/// The probe schedule: `fast` while requests wait, doubling to `max` while idle.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    fast: Duration,
    max: Duration,
    next_idle: Duration,
}

impl Backoff {
    pub(crate) fn new(fast: Duration, max: Duration) -> Self {
        Self {
            fast,
            max: max.max(fast),
            next_idle: fast,
        }
    }

    /// The wait before the next probe.
    pub(crate) fn next(&mut self, waiting: bool) -> Duration {
        if waiting {
            self.next_idle = self.fast;
            return self.fast;
        }
        let d = self.next_idle;
        self.next_idle = (d * 2).min(self.max);
        d
    }

    /// Back to the fast interval (something changed: a request is held, the
    /// upstream refused, the route flipped).
    pub(crate) fn reset(&mut self) {
        self.next_idle = self.fast;
    }
}

/// One probe's result: the addresses that accepted a connection.
pub(crate) type Outcome = io::Result<Vec<SocketAddr>>;

/// Probes `route`'s upstream until `stop`, feeding results to the route.
pub(crate) async fn run(route: Arc<RouteState>, stop: CancellationToken) {
    let settings = route.probe_settings();
    let mut backoff = Backoff::new(settings.interval, settings.max_interval);
    let mut in_flight = FuturesUnordered::new();
    let mut started: u64 = 0;
    let mut applied: u64 = 0;
    let mut next_at = tokio::time::Instant::now();
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            Some((n, outcome)) = in_flight.next(), if !in_flight.is_empty() => {
                // Probes overlap; an older result must not undo a newer one.
                if n > applied {
                    applied = n;
                    if route.probed(outcome) {
                        backoff.reset();
                    }
                }
            }
            _ = route.kicked() => {
                backoff.reset();
                next_at = tokio::time::Instant::now();
            }
            _ = tokio::time::sleep_until(next_at) => {
                if in_flight.len() < MAX_IN_FLIGHT {
                    started += 1;
                    let n = started;
                    let upstream = route.upstream.clone();
                    in_flight.push(
                        probe(upstream, settings.timeout).map(move |outcome| (n, outcome)),
                    );
                }
                route.prune_idle();
                next_at = tokio::time::Instant::now() + backoff.next(route.waiting() > 0);
            }
        }
    }
}

/// Resolves `upstream` and connects to each address, within `timeout`;
/// the addresses that accepted, or why none did.
pub(crate) async fn probe(upstream: String, timeout: Duration) -> Outcome {
    let started = Instant::now();
    let attempt = async {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(upstream.as_str())
            .await?
            .take(MAX_ADDRS)
            .collect();
        let mut connects: FuturesUnordered<_> = addrs
            .into_iter()
            .map(|a| TcpStream::connect(a).map(move |r| (a, r)))
            .collect();
        let mut last = io::Error::new(io::ErrorKind::NotFound, "name resolved to no address");
        while let Some((addr, result)) = connects.next().await {
            match result {
                Ok(_) => {
                    let mut ok = vec![addr];
                    // Others that answered by now come along; the rest are
                    // picked up by later probes.
                    while let Some(Some((a, Ok(_)))) = connects.next().now_or_never() {
                        ok.push(a);
                    }
                    return Ok(ok);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect timed out after {:?}", started.elapsed()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn fast_while_waiting_doubling_while_idle() {
        let mut b = Backoff::new(100 * MS, 1000 * MS);
        let idle: Vec<_> = (0..6).map(|_| b.next(false)).collect();
        assert_eq!(idle, [100, 200, 400, 800, 1000, 1000].map(|n| n * MS));
        // A waiter brings the fast interval back at once, and idling starts over.
        assert_eq!(b.next(true), 100 * MS);
        assert_eq!(b.next(true), 100 * MS);
        assert_eq!(b.next(false), 100 * MS);
        assert_eq!(b.next(false), 200 * MS);
        b.reset();
        assert_eq!(b.next(false), 100 * MS);
    }

    #[test]
    fn max_below_fast_is_fast() {
        let mut b = Backoff::new(100 * MS, 10 * MS);
        assert_eq!(b.next(false), 100 * MS);
        assert_eq!(b.next(false), 100 * MS);
    }

    #[tokio::test]
    async fn probe_reports_listening_and_refusing_addresses() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ok = probe(addr.to_string(), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(ok, vec![addr]);
        drop(listener);
        let err = probe(addr.to_string(), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    }
}
