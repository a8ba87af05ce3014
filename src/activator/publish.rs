//! Publishing each route's load into the store, so that every replica's
//! `source: activator` triggers read the sum over all activator replicas.
//!
//! One task per route reads its count and writes it as this replica's
//! entry ([`Store::record_route`]). It is woken at once when the count
//! crosses 0 ↔ non-zero (the wake-up of a workload at zero, and its going
//! idle, must not wait: both are written at once), and otherwise reads the
//! count every [`MIN_GAP`] while it is non-zero: a busy route does not wake
//! the publisher on every request. A changed count is written at most every
//! [`MIN_GAP`], an unchanged one every third of `pod_ttl`, so the entry
//! stays live (and its window history whole) while the replica runs and
//! drops out one TTL after it dies.
//!
//! Proxying never waits on this: the tasks only read the route's count. A
//! failed write is retried after [`RETRY`]; meanwhile the store refuses the
//! reads it cannot back (see `Store::route_load`), so triggers answer an
//! error rather than a count that lacks this replica's requests.

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::{Route, RouteSet};
use crate::store::{RouteSample, SharedStore};

/// Shortest time between two writes of one route's count that do not cross
/// zero, and how often a non-zero count is re-read: a busy route costs at
/// most ten writes (and ten wake-ups) a second.
pub(crate) const MIN_GAP: Duration = Duration::from_millis(100);
/// Wait after a failed write before the next attempt.
pub(crate) const RETRY: Duration = Duration::from_secs(1);

/// What was last written, and when.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Written {
    load: u64,
    at: Instant,
}

/// How long to wait before writing `load` (zero: now), given the last
/// successful write and the refresh period.
fn next_write(last: Option<Written>, load: u64, now: Instant, refresh: Duration) -> Duration {
    let Some(last) = last else {
        return Duration::ZERO;
    };
    let due = if (last.load == 0) != (load == 0) {
        return Duration::ZERO;
    } else if last.load != load {
        last.at + MIN_GAP
    } else {
        last.at + refresh
    };
    due.saturating_duration_since(now)
}

/// Starts one publisher per route of `routes`, writing as `replica`, until
/// `stop`. `pod_ttl` is the store's: entries are refreshed every third of it.
pub fn publish(
    routes: &RouteSet,
    store: SharedStore,
    replica: Arc<str>,
    pod_ttl: Duration,
    stop: CancellationToken,
) {
    let refresh = (pod_ttl / 3).max(MIN_GAP);
    for route in routes.iter() {
        let span = info_span!("activator_publish", route = %route.store_key(), %replica);
        tokio::spawn(
            run(
                route.clone(),
                store.clone(),
                replica.clone(),
                refresh,
                stop.clone(),
            )
            .instrument(span),
        );
    }
}

async fn run(
    route: Route,
    store: SharedStore,
    replica: Arc<str>,
    refresh: Duration,
    stop: CancellationToken,
) {
    let key = route.store_key();
    let mut last: Option<Written> = None;
    let mut failures = 0u32;
    loop {
        let now = Instant::now();
        // A crossing from here on wakes the wait below (`Notify` keeps it).
        let current = route.load();
        let mut wait = next_write(last, current, now, refresh);
        if wait.is_zero() {
            let sample = RouteSample {
                namespace: route.namespace(),
                route: &key,
                replica: &replica,
                load: current as f64,
            };
            match store.record_route(&sample).await {
                Ok(()) => {
                    if failures > 0 {
                        info!(failures, "route count published again");
                        failures = 0;
                    }
                    last = Some(Written {
                        load: current,
                        at: now,
                    });
                    continue;
                }
                Err(e) => {
                    if failures == 0 {
                        warn!(error = %e, load = current, "route count not published: triggers reading it answer errors until it is");
                    } else {
                        debug!(error = %e, failures, "route count still not published");
                    }
                    failures = failures.saturating_add(1);
                    last = None;
                    // Not cut short by changes: a busy route would retry a
                    // failing store on every request.
                    tokio::select! {
                        _ = tokio::time::sleep(RETRY) => continue,
                        _ = stop.cancelled() => return,
                    }
                }
            }
        }
        if current != 0 {
            // Only crossings wake us: look at a busy count again soon.
            wait = wait.min(MIN_GAP);
        }
        wait = wait.max(Duration::from_millis(1));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = route.crossed() => {}
            _ = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REFRESH: Duration = Duration::from_secs(5);

    fn written(load: u64, at: Instant) -> Option<Written> {
        Some(Written { load, at })
    }

    #[test]
    fn the_first_count_and_every_zero_crossing_are_written_at_once() {
        let t = Instant::now();
        let just = t + Duration::from_millis(1);
        assert_eq!(next_write(None, 0, t, REFRESH), Duration::ZERO);
        assert_eq!(next_write(written(0, t), 1, just, REFRESH), Duration::ZERO);
        assert_eq!(next_write(written(7, t), 0, just, REFRESH), Duration::ZERO);
    }

    #[test]
    fn other_changes_wait_for_the_gap_since_the_last_write() {
        let t = Instant::now();
        let ms = Duration::from_millis;
        assert_eq!(next_write(written(1, t), 2, t + ms(30), REFRESH), ms(70));
        assert_eq!(
            next_write(written(5, t), 3, t + ms(100), REFRESH),
            Duration::ZERO
        );
        assert_eq!(
            next_write(written(5, t), 3, t + ms(900), REFRESH),
            Duration::ZERO
        );
    }

    #[test]
    fn an_unchanged_count_is_refreshed_within_the_ttl_zero_included() {
        let t = Instant::now();
        let s = Duration::from_secs;
        assert_eq!(next_write(written(4, t), 4, t + s(1), REFRESH), s(4));
        assert_eq!(next_write(written(0, t), 0, t + s(2), REFRESH), s(3));
        assert_eq!(
            next_write(written(4, t), 4, t + s(6), REFRESH),
            Duration::ZERO
        );
    }
}
