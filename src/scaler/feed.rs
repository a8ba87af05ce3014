//! One read loop per distinct Envoy query, shared by every StreamIsActive
//! stream that asks it.
//!
//! A stream used to re-read the store itself whenever its namespace changed.
//! With 1,000 streams on one workload, one flip cost 1,000 reads (1,000 Redis
//! round trips with the Redis store), and the last stream learned of it
//! 160 ms late. Now the first stream of a `(query, aggregation)` starts a
//! feed: it reads once per change and publishes the value on a `watch`
//! channel; every stream compares that value with its own activation
//! threshold. The feed stops when its last stream is gone, and on a read
//! error, which it publishes first so that every stream ends with it.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::sync::watch;
use tracing::{Instrument, debug, info_span};

use super::{Scaler, WINDOW_RECHECK};
use crate::{Error, store::PodQuery, trigger::Aggregation, trigger::Trigger};

/// What a feed reads: the value depends on nothing else.
pub(super) type FeedKey = (PodQuery, Aggregation);

/// The latest reading: nothing yet, a value, or the error that ended the feed.
pub(super) type Reading = Option<Result<f64, Arc<Error>>>;

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

impl Scaler {
    /// A receiver of the shared value of `trigger`'s Envoy query, starting its
    /// feed when none runs.
    pub(super) fn subscribe(
        &self,
        key: FeedKey,
        trigger: &Arc<Trigger>,
    ) -> watch::Receiver<Reading> {
        let (rx, start) = self.feeds.join(&key);
        if let Some(tx) = start {
            let span = info_span!("activity_feed", namespace = %key.0.namespace);
            tokio::spawn(self.clone().feed(key, trigger.clone(), tx).instrument(span));
        }
        rx
    }

    async fn feed(self, key: FeedKey, trigger: Arc<Trigger>, tx: watch::Sender<Reading>) {
        debug!("feed started");
        self.metrics.scaler_feeds.inc();
        let _running = super::GaugeGuard(&self.metrics.scaler_feeds);
        let mut changes = self.store.watch(&key.0.namespace);
        let recheck = key.0.window.map(|_| WINDOW_RECHECK);
        tokio::select! {
            _ = tokio::time::sleep_until(self.warm_at) => {}
            _ = self.shutdown.cancelled() => {
                self.feeds.retire(&key, true);
                return;
            }
        }
        loop {
            // Everything up to now is covered by the read below.
            changes.borrow_and_update();
            match self.value(&trigger).await {
                Ok(v) => {
                    tx.send_if_modified(|last| {
                        let same = matches!(last, Some(Ok(old)) if *old == v);
                        *last = Some(Ok(v));
                        !same
                    });
                }
                Err(e) => {
                    // Unregister first so that a stream opened from now on
                    // starts a fresh feed instead of inheriting this error.
                    self.feeds.retire(&key, true);
                    tx.send_replace(Some(Err(Arc::new(e))));
                    return;
                }
            }
            let tick = async {
                match recheck {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = changes.changed() => if changed.is_err() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::PodSelector;

    fn key(ns: &str) -> FeedKey {
        (
            PodQuery {
                namespace: ns.into(),
                selector: PodSelector::Workload("web".into()),
                window: None,
            },
            Aggregation::Sum,
        )
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
