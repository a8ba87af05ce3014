//! One read loop per distinct query, shared by every watcher that asks it.
//!
//! With 1,000 StreamIsActive streams on one workload, one flip used to cost
//! 1,000 reads (1,000 Redis round trips with the Redis store, or 1,000
//! Prometheus queries per poll). Now the first watcher of a [`FeedKey`]
//! starts a feed: it reads once per change (Envoy: the store's change
//! signal; Prometheus: every poll interval) and publishes the value on a
//! `watch` channel; every watcher applies its own threshold. The feed stops
//! when its last watcher is gone or on shutdown.
//!
//! A read error does not stop it: the value becomes unknown (`None`), which
//! watchers treat as silence, and the feed retries on the next change signal
//! or after [`retry_after`] (or as long as the store says its warm-up lasts),
//! whichever comes first. Ending KEDA's streams with the error instead would
//! cost it its push channel for up to a minute after a short outage: it
//! doubles its reconnect wait (2 s up to 60 s) after every stream that ends
//! with an error status. Polling meanwhile answers with the error, so KEDA
//! applies its fallback.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use tokio::sync::watch;
use tracing::{Instrument, debug, info, info_span, warn};

use super::{Engine, EvalError, FeedKey};
use crate::source::Source;

/// How often a windowed Envoy feed re-reads without an ingest: values fall
/// out of a window with time alone.
const WINDOW_RECHECK: Duration = Duration::from_secs(1);

/// How often an activator feed re-reads without a change signal: a dead
/// replica's count leaves the sum at its TTL, and a windowed peak ages out,
/// without anyone writing.
const ACTIVATOR_RECHECK: Duration = Duration::from_secs(1);

/// The latest value, or `None` while it is unknown: nothing read yet, or the
/// last read failed.
pub type Reading = Option<f64>;

/// Wait before the next read after `failures` failed reads in a row: 1 s,
/// doubling, at most 5 s. The first retry comes soon because most outages
/// are short; a change signal (the Redis subscriber wakes every watcher when
/// it reconnects) cuts any wait short, so the timer matters for recoveries
/// that send none: refused writes accepted again, a Redis node's warm-up
/// ending. The cap is one Envoy flush: a stream learns the recovered state
/// no later than the data itself would change. Each retry is one read per
/// distinct query, not per stream.
pub(super) fn retry_after(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.min(3)).min(Duration::from_secs(5))
}

/// The running feeds, by key.
#[derive(Default)]
pub(super) struct Feeds {
    // std Mutex: held for a map operation only, never across an await.
    running: Mutex<HashMap<FeedKey, watch::Sender<Reading>>>,
}

impl Feeds {
    /// Joins the feed of `key`. When none runs, registers one and returns its
    /// sender too: the caller must then start it.
    fn join(&self, key: &FeedKey) -> (watch::Receiver<Reading>, Option<watch::Sender<Reading>>) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = running.get(key) {
            return (tx.subscribe(), None);
        }
        let (tx, rx) = watch::channel(None);
        running.insert(key.clone(), tx.clone());
        (rx, Some(tx))
    }

    /// Unregisters the feed of `key` if nobody reads it (or always, with
    /// `force`). False when a stream joined since the feed saw it idle: the
    /// feed must go on.
    fn retire(&self, key: &FeedKey, force: bool) -> bool {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        match running.get(key) {
            Some(tx) if !force && tx.receiver_count() > 0 => false,
            _ => {
                running.remove(key);
                true
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.running.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Engine {
    /// A receiver of the shared value of `key`, starting its feed when none
    /// runs.
    pub(super) fn subscribe(&self, key: FeedKey, source: &Source) -> watch::Receiver<Reading> {
        let (rx, start) = self.feeds.join(&key);
        if let Some(tx) = start {
            let span = info_span!("feed", namespace = key.namespace());
            tokio::spawn(self.clone().feed(key, source.clone(), tx).instrument(span));
        }
        rx
    }

    async fn feed(self, key: FeedKey, source: Source, tx: watch::Sender<Reading>) {
        debug!("feed started");
        self.metrics.scaler_feeds.inc();
        let _running = GaugeGuard(&self.metrics.scaler_feeds);
        // Envoy values change with the store's signal (and, windowed, with
        // time); Prometheus values only tell by being asked again.
        let (mut changes, recheck) = match &key {
            FeedKey::Envoy(query, _) => (
                Some(self.store.watch(&query.namespace)),
                query.window.map(|_| WINDOW_RECHECK),
            ),
            FeedKey::Prometheus(_) => (None, Some(self.poll_interval)),
            // Every replica's publisher writes its count to the store, which
            // signals the namespace; a dead replica's count and windowed
            // peaks expire with time alone. An unknown route is retried as
            // a failed read.
            FeedKey::Activator(r) => (
                Some(self.store.watch(&r.namespace)),
                Some(ACTIVATOR_RECHECK),
            ),
        };
        let mut failures = 0u32;
        let mut unknown = UnknownGauge {
            gauge: &self.metrics.scaler_feeds_unknown,
            set: false,
        };
        loop {
            // Everything up to now is covered by the read below.
            if let Some(c) = changes.as_mut() {
                c.borrow_and_update();
            }
            let wait = match self.read(&source).await {
                Ok(v) => {
                    if failures > 0 {
                        info!(failures, "activity known again");
                        failures = 0;
                    }
                    unknown.set(false);
                    // From unknown to any value wakes the streams: each
                    // pushes only if its state differs from what it sent.
                    tx.send_if_modified(|last| {
                        let same = *last == Some(v);
                        *last = Some(v);
                        !same
                    });
                    recheck
                }
                Err(EvalError::WarmingUp(left)) => {
                    // The store says when it can be trusted: no sooner, no later.
                    debug!(?left, "warming up");
                    Some(left)
                }
                Err(e) => {
                    if failures == 0 {
                        warn!(error = %e, "activity unknown: streams stay open and silent until the read succeeds");
                    } else {
                        debug!(error = %e, failures, "activity still unknown");
                    }
                    // Unknown, without waking anyone: streams keep the state
                    // they last sent; one opened now waits for a value.
                    tx.send_if_modified(|last| {
                        *last = None;
                        false
                    });
                    unknown.set(true);
                    let wait = retry_after(failures);
                    failures = failures.saturating_add(1);
                    Some(wait)
                }
            };
            let tick = async {
                match wait {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            let changed = async {
                match changes.as_mut() {
                    Some(c) => c.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                alive = changed => if !alive {
                    self.feeds.retire(&key, true);
                    return;
                },
                _ = tick => {}
                _ = tx.closed() => if self.feeds.retire(&key, false) {
                    debug!("feed stopped: no stream left");
                    return;
                },
                _ = self.shutdown.cancelled() => {
                    self.feeds.retire(&key, true);
                    return;
                }
            }
        }
    }
}

struct GaugeGuard<'a>(&'a prometheus_client::metrics::gauge::Gauge);

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Counts the feed in `scaler_feeds_unknown` while its value is unknown,
/// until it is known again or the feed stops.
struct UnknownGauge<'a> {
    gauge: &'a prometheus_client::metrics::gauge::Gauge,
    set: bool,
}

impl UnknownGauge<'_> {
    fn set(&mut self, unknown: bool) {
        if unknown != self.set {
            if unknown {
                self.gauge.inc();
            } else {
                self.gauge.dec();
            }
            self.set = unknown;
        }
    }
}

impl Drop for UnknownGauge<'_> {
    fn drop(&mut self) {
        self.set(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        source::envoy::Aggregation,
        store::{PodQuery, PodSelector},
    };

    fn key(ns: &str) -> FeedKey {
        FeedKey::Envoy(
            PodQuery {
                namespace: ns.into(),
                selector: PodSelector::Workload("web".into()),
                window: None,
            },
            Aggregation::Sum,
        )
    }

    #[test]
    fn retries_start_soon_and_are_capped_at_one_flush() {
        assert_eq!(retry_after(0), Duration::from_secs(1));
        assert_eq!(retry_after(1), Duration::from_secs(2));
        assert_eq!(retry_after(2), Duration::from_secs(4));
        assert_eq!(retry_after(3), Duration::from_secs(5));
        assert_eq!(retry_after(u32::MAX), Duration::from_secs(5));
    }

    #[test]
    fn streams_of_one_query_share_one_feed() {
        let feeds = Feeds::default();
        let (_a, start_a) = feeds.join(&key("a"));
        let (_b, start_b) = feeds.join(&key("a"));
        let (_c, start_c) = feeds.join(&key("other"));
        assert!(start_a.is_some());
        assert!(
            start_b.is_none(),
            "the second stream joins the running feed"
        );
        assert!(start_c.is_some(), "another query gets its own feed");
        assert_eq!(feeds.len(), 2);
    }

    #[test]
    fn a_feed_retires_only_when_idle_unless_forced() {
        let feeds = Feeds::default();
        let (rx, tx) = feeds.join(&key("a"));
        let _tx = tx.expect("first join starts the feed");
        assert!(!feeds.retire(&key("a"), false), "a stream still reads it");
        drop(rx);
        assert!(feeds.retire(&key("a"), false));
        assert_eq!(feeds.len(), 0);
        let (_rx, tx) = feeds.join(&key("a"));
        assert!(
            tx.is_some(),
            "after retiring, the next stream starts a new feed"
        );
        assert!(feeds.retire(&key("a"), true));
        assert_eq!(feeds.len(), 0);
    }
}
