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
//!
//! Besides pods it keeps the activator's route counts ([`Store::record_route`],
//! [`Store::route_load`]): each activator replica's pending + active requests
//! per route, in a keyspace of their own that no pod query reads, with the
//! same TTL (a dead replica's count drops out) and history (for `window`).

pub mod memory;
pub mod redis;
pub mod window;

use std::{borrow::Cow, collections::HashMap, net::IpAddr, sync::Arc, time::Duration};

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
    /// The activescale replica holding the pod's sidecar stream: the one
    /// whose sink wrote it last. `None` where the read did not ask for it
    /// (the Redis store's scaling answers) or nothing recorded it (a pod
    /// written by a version before it).
    pub replica: Option<Arc<str>>,
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

/// Default of `max_families_per_pod`.
pub use crate::config::DEFAULT_MAX_FAMILIES;

/// One Envoy message's worth of samples for one pod, as the sink writes it.
#[derive(Clone, Copy, Debug)]
pub struct Ingest<'a> {
    pub pod: &'a PodIdentity,
    /// Family name and value. Values are whole numbers in `[0, 1e9]` (the
    /// sink checks them), so the stores' sums are exact. Sorted by name
    /// without repeats, as the sink sends them, for a linear merge; other
    /// callers' lists are put in that order by [`sorted_families`].
    pub families: &'a [(String, f64)],
    /// The address the pod's stream comes from. A pod stays bound to the
    /// first address it was seen from until it expires; a write from another
    /// one is refused. `None`: an unknown address, which binds nothing and is
    /// not refused (tests and tools; the sink always knows its peer).
    pub peer: Option<IpAddr>,
    /// Distinct families the pod may hold. New families past it are refused;
    /// those it holds keep updating.
    pub max_families: usize,
    /// The activescale replica whose sink holds the pod's stream (see
    /// [`replica_name`]): kept per pod, the latest writer's, for `/v1/pods`.
    pub replica: &'a str,
}

/// What became of an [`Ingest`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ingested {
    /// Written, except `refused` new families past the pod's cap.
    Stored { refused: u64 },
    /// Nothing written: the pod is live and bound to another address.
    BoundElsewhere { bound: IpAddr },
}

/// One activator replica's load of one route, as its publisher writes it.
#[derive(Clone, Copy, Debug)]
pub struct RouteSample<'a> {
    /// The route's namespace: whose triggers read it, and whose watchers wake.
    pub namespace: &'a str,
    /// The route as matched, host then path prefix (`web.example.com/api/`):
    /// the same on every replica configured with the route.
    pub route: &'a str,
    /// Which activator replica holds these requests.
    pub replica: &'a str,
    /// Its pending + active requests: a whole number.
    pub load: f64,
}

/// The store behind the sink and the scaler.
///
/// Implementations are cheap clonable handles (`Arc` inside) and must be safe
/// to call from many streams at once.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Records one Envoy message's worth of samples: sets the families it
    /// carries (others keep their value, new ones are added up to the cap),
    /// recomputes the pod's value and refreshes its last-seen time, unless the
    /// live pod is bound to another address. An empty `families` still
    /// refreshes it. In one step (one lock, one script): replicas sharing a
    /// store agree on the binding.
    async fn ingest(&self, ingest: &Ingest<'_>) -> Result<Ingested, StoreError>;

    /// [`Store::ingest`] from no known address, with the default cap: for
    /// tests and tools.
    async fn record(
        &self,
        pod: &PodIdentity,
        families: &[(String, f64)],
    ) -> Result<(), StoreError> {
        self.ingest(&Ingest {
            pod,
            families,
            peer: None,
            max_families: DEFAULT_MAX_FAMILIES,
            replica: local_replica(),
        })
        .await
        .map(drop)
    }

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

    /// [`Store::pods`] as a scaling answer (the Custom Metrics API): refused
    /// wherever a summed read would be (a store that knows its list may be
    /// incomplete says so), while `pods` shows what is there, for debugging.
    /// With `window`, each pod's `value` is reduced over it as
    /// [`Store::values`] does for `PodQuery::window`.
    async fn answer_pods(
        &self,
        namespace: &str,
        selector: Option<&PodSelector>,
        window: Option<Window>,
    ) -> Result<Vec<PodView>, StoreError>;

    /// A receiver that is marked changed whenever a pod of `namespace` appears,
    /// changes value or expires (on any replica, for shared stores). Bursts
    /// coalesce: a watcher re-reads after each wake-up, it never misses the
    /// latest state.
    fn watch(&self, namespace: &str) -> watch::Receiver<u64>;

    /// Sets one replica's load of one route and refreshes its last-seen
    /// time; the entry drops out of [`Store::route_load`] after `pod_ttl`
    /// without a write. A change of the route's count wakes the namespace's
    /// watchers (on every replica, for shared stores).
    async fn record_route(&self, sample: &RouteSample<'_>) -> Result<(), StoreError>;

    /// The sum over live replicas of a route's load, each replica's load
    /// reduced over `window` first when asked (as pods are for envoy
    /// triggers). 0 when no live replica reports the route.
    async fn route_load(
        &self,
        namespace: &str,
        route: &str,
        window: Option<Window>,
    ) -> Result<f64, StoreError>;

    /// Whether the backend answers right now (for `/readyz`).
    async fn ready(&self) -> Result<(), StoreError>;

    /// How long until this store's answers count every pod, when they do not
    /// yet: a store that starts empty while sidecars run fills up only as
    /// they report again. `None`: its answers can be trusted now (a store
    /// that learns it is young on its own reads says so in their errors).
    fn warming_up(&self) -> Option<Duration> {
        None
    }

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

/// Longest replica name kept: a DNS subdomain's, which a pod name is.
pub const MAX_REPLICA_NAME: usize = 253;

/// This replica's name: the pod name where Kubernetes sets `HOSTNAME`, else
/// the process id. Bounded (see [`bounded_replica`]): it is stored per pod
/// and shown on every `/v1/pods` row.
pub fn replica_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .map(|h| bounded_replica(&h).to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| std::process::id().to_string())
}

/// `name` cut to at most [`MAX_REPLICA_NAME`] bytes, at a char boundary.
/// Kubernetes never sets a longer `HOSTNAME`; an environment that does
/// must not make every pod's entry large.
pub fn bounded_replica(name: &str) -> &str {
    if name.len() <= MAX_REPLICA_NAME {
        return name;
    }
    let mut end = MAX_REPLICA_NAME;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// [`replica_name`], read once: the replica [`Store::record`] writes as.
fn local_replica() -> &'static str {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(replica_name)
}

/// Sum of a pod's families: its requests in flight over every inbound port.
/// Exact: the values are whole numbers far below 2^53. From `0.0`: `sum()`
/// of no floats is `-0.0`.
pub fn pod_value<'a>(families: impl IntoIterator<Item = &'a f64>) -> f64 {
    families.into_iter().fold(0.0, |a, v| a + v)
}

/// `families` sorted by name without repeats (the last of a name wins): the
/// order [`Ingest::families`] promises. Borrowed when already so, as from
/// the sink.
pub fn sorted_families(families: &[(String, f64)]) -> Cow<'_, [(String, f64)]> {
    if families.windows(2).all(|w| w[0].0 < w[1].0) {
        return Cow::Borrowed(families);
    }
    let mut owned = families.to_vec();
    // Stable: repeats stay in message order, and the last one is kept.
    owned.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out: Vec<(String, f64)> = Vec::with_capacity(owned.len());
    for f in owned {
        match out.last_mut() {
            Some(last) if last.0 == f.0 => *last = f,
            _ => out.push(f),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_sorted_once_and_the_last_repeat_wins() {
        let f = |v: &[(&str, f64)]| -> Vec<(String, f64)> {
            v.iter().map(|(n, v)| (n.to_string(), *v)).collect()
        };
        let sorted = f(&[("a", 1.0), ("b", 2.0)]);
        assert!(matches!(sorted_families(&sorted), Cow::Borrowed(_)));
        assert_eq!(
            sorted_families(&f(&[("b", 1.0), ("a", 2.0), ("b", 3.0), ("a", 4.0)])).into_owned(),
            f(&[("a", 4.0), ("b", 3.0)])
        );
        assert!(sorted_families(&[]).is_empty());
        assert_eq!(pod_value(&[]).to_bits(), 0.0f64.to_bits(), "0, not -0");
    }

    #[test]
    fn replica_names_are_cut_at_a_char_boundary() {
        assert_eq!(
            bounded_replica("activescale-7d9f-x2x"),
            "activescale-7d9f-x2x"
        );
        assert_eq!(bounded_replica(""), "");
        let exact = "a".repeat(MAX_REPLICA_NAME);
        assert_eq!(bounded_replica(&exact), exact);
        let long = "b".repeat(MAX_REPLICA_NAME + 40);
        assert_eq!(bounded_replica(&long).len(), MAX_REPLICA_NAME);
        // 'é' is two bytes: byte 253 falls inside the 127th.
        let wide = "é".repeat(200);
        let cut = bounded_replica(&wide);
        assert_eq!(cut.len(), MAX_REPLICA_NAME - 1);
        assert!(wide.starts_with(cut));
        let emoji = "🦀".repeat(100);
        assert_eq!(bounded_replica(&emoji).len(), 252, "63 crabs of 4 bytes");
    }

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
