//! The per-pod sample store the sink writes and the scaler reads.
//!
//! [`Store`] is the only thing the two sides share. Implementations:
//! [`memory::MemoryStore`] (one replica, nothing to install) and
//! [`redis::RedisStore`] (several replicas, one shared view). Both pass the same
//! conformance suite (`tests/store_conformance.rs`).
//!
//! The store owns time: a pod not heard from for `pod_ttl` is gone from every
//! answer, and a pod's value history (for `window` triggers) is kept only as
//! long as the longest window allowed.

pub mod memory;
pub mod redis;
pub mod window;

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_trait::async_trait;
use serde::Serialize;
use tokio::sync::watch;

use crate::selector::{Labels, Selector};

pub use window::{Window, WindowReduce};

/// Who a pod is, as learned from its sidecar's stream identifier.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
pub struct PodIdentity {
    pub namespace: String,
    pub name: String,
    /// Istio's `WORKLOAD_NAME` (the Deployment or similar), when known.
    pub workload: Option<String>,
    /// Shared: every pod of a workload carries the same set.
    pub labels: Arc<Labels>,
}

/// Which pods of a namespace a query reads.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PodSelector {
    Labels(Selector),
    Workload(String),
}

impl PodSelector {
    pub fn matches(&self, pod: &PodIdentity) -> bool {
        match self {
            PodSelector::Labels(s) => s.matches(&pod.labels),
            PodSelector::Workload(w) => pod.workload.as_deref() == Some(w.as_str()),
        }
    }
}

/// A read of the pods of one namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PodQuery {
    pub namespace: String,
    pub selector: PodSelector,
    /// Reduce each pod's value over this window before returning it.
    pub window: Option<Window>,
}

/// What `/v1/pods` shows for one pod: everything the scaler sees.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PodView {
    #[serde(flatten)]
    pub identity: PodIdentity,
    /// The pod's value: the sum of its kept families.
    pub value: f64,
    /// The latest value of each kept stat family.
    pub families: HashMap<String, f64>,
    /// Time since the pod's sidecar last reported.
    #[serde(serialize_with = "serialize_secs")]
    pub age: Duration,
}

fn serialize_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// Count, sum and maximum of the values of the live pods matching a query:
/// all any aggregation needs, without a value per pod.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub count: u64,
    pub sum: f64,
    /// Meaningful only when `count > 0`, and only when asked for (see
    /// [`Store::summary`]); `f64::MIN` otherwise.
    pub max: f64,
}

impl Summary {
    pub const EMPTY: Summary = Summary {
        count: 0,
        sum: 0.0,
        max: f64::MIN,
    };

    pub fn of(values: &[f64]) -> Summary {
        values.iter().copied().fold(Summary::EMPTY, Summary::with)
    }

    /// This summary with one more pod's value.
    pub fn with(self, v: f64) -> Summary {
        Summary {
            count: self.count + 1,
            sum: self.sum + v,
            max: self.max.max(v),
        }
    }
}

/// Failures of a store backend. None of them is ever turned into a value.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store timed out after {0:?}")]
    Timeout(Duration),
    #[error("store returned unexpected data: {0}")]
    Corrupt(String),
}

/// The store behind the sink and the scaler.
///
/// Implementations are cheap clonable handles (`Arc` inside) and must be safe
/// to call from many streams at once.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Records one Envoy message's worth of samples for `pod`: sets the families
    /// it carries (others keep their value), recomputes the pod's value and
    /// refreshes its last-seen time. An empty `families` still refreshes it.
    async fn record(&self, pod: &PodIdentity, families: &[(String, f64)])
    -> Result<(), StoreError>;

    /// The value of every live pod matching `query`, window-reduced when asked.
    async fn values(&self, query: &PodQuery) -> Result<Vec<f64>, StoreError>;

    /// Count, sum and (when `with_max`) maximum of what [`Store::values`]
    /// returns. Shared stores override it to avoid reading every pod: keeping
    /// a maximum is not cheap for them, hence `with_max`.
    async fn summary(&self, query: &PodQuery, with_max: bool) -> Result<Summary, StoreError> {
        let _ = with_max;
        Ok(Summary::of(&self.values(query).await?))
    }

    /// Every live pod of `namespace` (matching `selector` when given), for debugging.
    async fn pods(
        &self,
        namespace: &str,
        selector: Option<&PodSelector>,
    ) -> Result<Vec<PodView>, StoreError>;

    /// A receiver that is marked changed whenever a pod of `namespace` appears,
    /// changes value or expires (on any replica, for shared stores). Bursts
    /// coalesce: a watcher re-reads after each wake-up, it never misses the
    /// latest state.
    fn watch(&self, namespace: &str) -> watch::Receiver<u64>;

    /// Whether the backend answers right now (for `/readyz`).
    async fn ready(&self) -> Result<(), StoreError>;

    /// Number of pods tracked, where cheap to know (for `/metrics`).
    fn tracked_pods(&self) -> Option<u64> {
        None
    }
}

/// A shared handle on whichever store the config chose.
pub type SharedStore = Arc<dyn Store>;

/// Per-namespace change signals, shared by both stores.
///
/// A `watch` channel per namespace with a version counter: only streams of the
/// namespace that changed wake, and a burst of ingests collapses into one
/// re-read. Senders without receivers are dropped on the next notify.
#[derive(Default)]
pub struct Notifier {
    // std Mutex: held for a map lookup only, never across an await.
    channels: std::sync::Mutex<HashMap<String, watch::Sender<u64>>>,
}

impl Notifier {
    pub fn subscribe(&self, namespace: &str) -> watch::Receiver<u64> {
        let mut map = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(namespace) {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = watch::channel(0);
                map.insert(namespace.to_owned(), tx);
                rx
            }
        }
    }

    pub fn notify(&self, namespace: &str) {
        let mut map = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = map.get(namespace) {
            if tx.receiver_count() == 0 {
                map.remove(namespace);
            } else {
                tx.send_modify(|v| *v = v.wrapping_add(1));
            }
        }
    }

    /// Namespaces that have at least one watcher; forgets the others.
    pub fn watched(&self) -> Vec<String> {
        let mut map = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, tx| tx.receiver_count() > 0);
        map.keys().cloned().collect()
    }

    /// Wakes every watcher (after a reconnect, when changes may have been missed).
    pub fn notify_all(&self) {
        let map = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        for tx in map.values() {
            tx.send_modify(|v| *v = v.wrapping_add(1));
        }
    }
}

/// Sum of a pod's families: its requests in flight over every inbound port.
pub fn pod_value<'a>(families: impl IntoIterator<Item = &'a f64>) -> f64 {
    families.into_iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_values() {
        assert_eq!(Summary::of(&[]), Summary::EMPTY);
        assert_eq!(
            Summary::of(&[2.0, 5.0, 1.0]),
            Summary {
                count: 3,
                sum: 8.0,
                max: 5.0
            }
        );
        let neg = Summary::of(&[-3.0, -1.5]);
        assert_eq!((neg.count, neg.sum, neg.max), (2, -4.5, -1.5));
    }

    #[tokio::test]
    async fn notifier_wakes_only_its_namespace() {
        let n = Notifier::default();
        let mut a = n.subscribe("a");
        let b = n.subscribe("b");
        n.notify("a");
        assert!(a.has_changed().unwrap());
        assert!(!b.has_changed().unwrap());
        a.borrow_and_update();
        n.notify_all();
        assert!(a.has_changed().unwrap() && b.has_changed().unwrap());
    }

    #[test]
    fn notifier_forgets_namespaces_nobody_watches() {
        let n = Notifier::default();
        drop(n.subscribe("gone"));
        n.notify("gone");
        assert!(n.channels.lock().unwrap().is_empty());
        let _kept = n.subscribe("kept");
        drop(n.subscribe("dropped"));
        assert_eq!(n.watched(), vec!["kept".to_string()]);
    }
}
