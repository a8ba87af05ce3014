//! The embedded store: one replica, nothing to install.
//!
//! Pods live in a map per namespace, so a query touches one namespace only.
//! Reads filter out pods past their TTL themselves; a background sweeper only
//! reclaims their memory and tells watchers that the pod is gone.
//!
//! A write holds the write lock for one linear merge of at most
//! `max_families` names (both sides sorted by name), never longer.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{Arc, RwLock, Weak},
    time::Duration,
};

use async_trait::async_trait;
use tokio::{sync::watch, time::Instant};

use super::{
    Ingest, Ingested, Notifier, PodIdentity, PodQuery, PodSelector, PodView, RouteSample, Store,
    StoreError, Summary, Window, pod_value, sorted_families, window,
};
use crate::selector::Labels;

/// Handle on the in-memory store; clones share the same data.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
    /// Until then its answers are not trusted (see [`MemoryStore::warming_up_for`]).
    warm_at: Option<Instant>,
}

struct Inner {
    // std RwLock, not tokio's: every critical section is a few map operations
    // with no await inside, and the sink takes the write side once per message.
    namespaces: RwLock<Namespaces>,
    // Label sets shared by all pods of a workload are stored once.
    labels: std::sync::Mutex<HashSet<Arc<Labels>>>,
    // So are stat names: every pod reports the same few; and replica
    // names, which every pod of a replica's streams shares.
    names: std::sync::Mutex<HashSet<Arc<str>>>,
    /// Activator route loads, apart from the pods: no pod query sees them.
    // std Mutex: a map operation per publisher write or trigger read.
    routes: std::sync::Mutex<Routes>,
    notifier: Notifier,
    ttl: Duration,
    /// History older than this is forgotten: no window may be longer.
    max_window: Duration,
    origin: Instant,
}

/// Pods by name, by namespace.
type Namespaces = HashMap<Box<str>, HashMap<Box<str>, Pod>>;

/// Replica entries by replica, by (namespace, route).
type Routes = HashMap<(Box<str>, Box<str>), HashMap<Box<str>, RouteEntry>>;

/// One replica's load of one route.
struct RouteEntry {
    value: f64,
    last_seen_ms: u64,
    history: Vec<window::Point>,
}

struct Pod {
    identity: Arc<PodIdentity>,
    /// `identity.labels`, held inline: a query over thousands of pods then
    /// compares this pointer without a cache miss on each pod's identity.
    labels: Arc<Labels>,
    /// Latest value per kept stat family, sorted by name; a handful, at
    /// most `max_families`.
    families: Vec<(Arc<str>, f64)>,
    /// The address the pod was first seen from (`None`: written without
    /// one); writes from others are refused while the pod is live.
    address: Option<IpAddr>,
    /// The replica that wrote the pod last (interned: one per replica).
    replica: Arc<str>,
    value: f64,
    last_seen_ms: u64,
    history: Vec<window::Point>,
}

impl MemoryStore {
    /// Creates the store and starts its expiry sweeper on the current runtime.
    /// The sweeper stops when the last handle is dropped.
    pub fn new(ttl: Duration, max_window: Duration) -> Self {
        let inner = Arc::new(Inner {
            namespaces: RwLock::default(),
            labels: Default::default(),
            names: Default::default(),
            routes: Default::default(),
            notifier: Notifier::default(),
            ttl,
            max_window,
            origin: Instant::now(),
        });
        tokio::spawn(sweep(Arc::downgrade(&inner)));
        Self {
            inner,
            warm_at: None,
        }
    }

    /// A store that is empty at start although sidecars are running: until
    /// each has reconnected and reported (two Envoy flushes by default), an
    /// answer would count only some pods. Its answers wait `warmup`.
    pub fn warming_up_for(mut self, warmup: Duration) -> Self {
        self.warm_at = Some(Instant::now() + warmup);
        self
    }
}

impl Inner {
    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    fn is_live(&self, pod: &Pod, now_ms: u64) -> bool {
        self.seen_within_ttl(pod.last_seen_ms, now_ms)
    }

    fn seen_within_ttl(&self, last_seen_ms: u64, now_ms: u64) -> bool {
        now_ms.saturating_sub(last_seen_ms) < self.ttl.as_millis() as u64
    }

    /// Removes expired route entries; returns the namespaces whose count
    /// changed with them.
    fn expire_routes(&self) -> Vec<Box<str>> {
        let now = self.now_ms();
        let mut changed = Vec::new();
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        routes.retain(|(ns, _), replicas| {
            let mut lost_load = false;
            replicas.retain(|_, e| {
                let live = self.seen_within_ttl(e.last_seen_ms, now);
                lost_load |= !live && e.value != 0.0;
                live
            });
            if lost_load {
                changed.push(ns.clone());
            }
            !replicas.is_empty()
        });
        changed
    }

    /// Calls `f` with the (window-reduced) value of every live pod matching `query`.
    fn each_value(&self, query: &PodQuery, mut f: impl FnMut(f64)) {
        let now = self.now_ms();
        let namespaces = self.namespaces.read().unwrap_or_else(|e| e.into_inner());
        let Some(pods) = namespaces.get(query.namespace.as_str()) else {
            return;
        };
        let mut selector = MemoSelector::new(&query.selector);
        for p in pods.values() {
            if self.is_live(p, now) && selector.matches(p) {
                f(match query.window {
                    Some(w) => window::reduce(&p.history, now, w).unwrap_or(p.value),
                    None => p.value,
                });
            }
        }
    }

    fn intern(&self, identity: &PodIdentity) -> Arc<PodIdentity> {
        let mut table = self.labels.lock().unwrap_or_else(|e| e.into_inner());
        let labels = match table.get(&*identity.labels) {
            Some(shared) => Arc::clone(shared),
            None => {
                table.insert(Arc::clone(&identity.labels));
                Arc::clone(&identity.labels)
            }
        };
        Arc::new(PodIdentity {
            labels,
            ..identity.clone()
        })
    }

    fn intern_name(&self, name: &str) -> Arc<str> {
        let mut table = self.names.lock().unwrap_or_else(|e| e.into_inner());
        match table.get(name) {
            Some(shared) => Arc::clone(shared),
            None => {
                let shared: Arc<str> = name.into();
                table.insert(Arc::clone(&shared));
                shared
            }
        }
    }

    /// Removes expired pods; returns the namespaces that lost one.
    fn expire(&self) -> Vec<Box<str>> {
        let now = self.now_ms();
        let mut changed = Vec::new();
        let mut namespaces = self.namespaces.write().unwrap_or_else(|e| e.into_inner());
        namespaces.retain(|ns, pods| {
            let before = pods.len();
            pods.retain(|_, pod| self.is_live(pod, now));
            if pods.len() != before {
                changed.push(ns.clone());
            }
            !pods.is_empty()
        });
        changed
    }
}

/// A label selector evaluated once per interned label set: the pods of a
/// workload share one `Arc<Labels>`, so a query over many pods compares
/// pointers instead of walking label maps.
struct MemoSelector<'a> {
    selector: &'a PodSelector,
    // (address of an interned label set, whether it matched); a handful of
    // workloads per namespace is the norm, so a short list beats a map.
    seen: Vec<(usize, bool)>,
}

impl<'a> MemoSelector<'a> {
    const CAPACITY: usize = 16;

    fn new(selector: &'a PodSelector) -> Self {
        Self {
            selector,
            seen: Vec::new(),
        }
    }

    fn matches(&mut self, pod: &Pod) -> bool {
        let PodSelector::Labels(selector) = self.selector else {
            return self.selector.matches(&pod.identity);
        };
        // Valid while the caller holds the store lock: every address belongs
        // to a label set a live pod keeps alive.
        let key = Arc::as_ptr(&pod.labels) as usize;
        if let Some(&(_, hit)) = self.seen.iter().find(|(k, _)| *k == key) {
            return hit;
        }
        let hit = selector.matches(&pod.labels);
        if self.seen.len() < Self::CAPACITY {
            self.seen.push((key, hit));
        }
        hit
    }
}

async fn sweep(inner: Weak<Inner>) {
    let period = match inner.upgrade() {
        Some(i) => (i.ttl / 8).clamp(Duration::from_millis(20), Duration::from_secs(1)),
        None => return,
    };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        for ns in inner.expire().into_iter().chain(inner.expire_routes()) {
            inner.notifier.notify(&ns);
        }
        if let Ok(mut table) = inner.labels.lock() {
            // Label sets no pod uses any more (only the table holds them).
            table.retain(|labels| Arc::strong_count(labels) > 1);
        }
        if let Ok(mut table) = inner.names.lock() {
            table.retain(|name| Arc::strong_count(name) > 1);
        }
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn warming_up(&self) -> Option<Duration> {
        let left = self.warm_at?.checked_duration_since(Instant::now())?;
        (!left.is_zero()).then_some(left)
    }

    async fn ingest(&self, ingest: &Ingest<'_>) -> Result<Ingested, StoreError> {
        let inner = &*self.inner;
        let pod = ingest.pod;
        // Sorted before the lock is taken (the sink's lists already are).
        let families = sorted_families(ingest.families);
        let now = inner.now_ms();
        let (changed, refused) = {
            let mut namespaces = inner.namespaces.write().unwrap_or_else(|e| e.into_inner());
            let pods = match namespaces.get_mut(pod.namespace.as_str()) {
                Some(p) => p,
                None => namespaces.entry(pod.namespace.as_str().into()).or_default(),
            };
            let live = pods
                .get_mut(pod.name.as_str())
                .filter(|entry| inner.is_live(entry, now));
            if let Some(entry) = &live
                && let (Some(bound), Some(peer)) = (entry.address, ingest.peer)
                && bound != peer
            {
                return Ok(Ingested::BoundElsewhere { bound });
            }
            match live {
                Some(entry) if *entry.identity == *pod => {
                    let before = entry.value;
                    let refused = merge(&mut entry.families, &families, ingest.max_families, |n| {
                        inner.intern_name(n)
                    });
                    entry.value = pod_value(entry.families.iter().map(|(_, v)| v));
                    entry.last_seen_ms = now;
                    entry.address = entry.address.or(ingest.peer);
                    // A string compare per message; the table only on a change.
                    if *entry.replica != *ingest.replica {
                        entry.replica = inner.intern_name(ingest.replica);
                    }
                    window::push(&mut entry.history, now, entry.value, inner.max_window);
                    (entry.value != before, refused)
                }
                live => {
                    // New pod, a pod back after expiry, or new labels: start
                    // afresh (bound where it was, if it is live).
                    let address = live.and_then(|e| e.address).or(ingest.peer);
                    let mut kept = Vec::new();
                    let refused = merge(&mut kept, &families, ingest.max_families, |n| {
                        inner.intern_name(n)
                    });
                    let value = pod_value(kept.iter().map(|(_, v)| v));
                    // Exactly one point until the value changes: most pods'
                    // history never grows.
                    let mut history = Vec::with_capacity(1);
                    window::push(&mut history, now, value, inner.max_window);
                    let identity = inner.intern(pod);
                    pods.insert(
                        pod.name.as_str().into(),
                        Pod {
                            labels: Arc::clone(&identity.labels),
                            identity,
                            families: kept,
                            address,
                            replica: inner.intern_name(ingest.replica),
                            value,
                            last_seen_ms: now,
                            history,
                        },
                    );
                    (true, refused)
                }
            }
        };
        if changed {
            inner.notifier.notify(&pod.namespace);
        }
        Ok(Ingested::Stored { refused })
    }

    async fn values(&self, query: &PodQuery) -> Result<Vec<f64>, StoreError> {
        let mut out = Vec::new();
        self.inner.each_value(query, |v| out.push(v));
        Ok(out)
    }

    async fn summary(&self, query: &PodQuery, _with_max: bool) -> Result<Summary, StoreError> {
        // Folded in place: a Vec of 10,000 values per call was a fresh
        // allocation (and page faults) on every GetMetrics.
        let mut s = Summary::EMPTY;
        self.inner.each_value(query, |v| s = s.with(v));
        Ok(s)
    }

    async fn record_route(&self, sample: &RouteSample<'_>) -> Result<(), StoreError> {
        let inner = &*self.inner;
        let now = inner.now_ms();
        let changed = {
            let mut routes = inner.routes.lock().unwrap_or_else(|e| e.into_inner());
            let replicas = routes
                .entry((sample.namespace.into(), sample.route.into()))
                .or_default();
            match replicas
                .get_mut(sample.replica)
                .filter(|e| inner.seen_within_ttl(e.last_seen_ms, now))
            {
                Some(e) => {
                    let changed = e.value != sample.load;
                    e.value = sample.load;
                    e.last_seen_ms = now;
                    window::push(&mut e.history, now, sample.load, inner.max_window);
                    changed
                }
                None => {
                    let mut history = Vec::with_capacity(1);
                    window::push(&mut history, now, sample.load, inner.max_window);
                    replicas.insert(
                        sample.replica.into(),
                        RouteEntry {
                            value: sample.load,
                            last_seen_ms: now,
                            history,
                        },
                    );
                    true
                }
            }
        };
        if changed {
            inner.notifier.notify(sample.namespace);
        }
        Ok(())
    }

    async fn route_load(
        &self,
        namespace: &str,
        route: &str,
        window: Option<Window>,
    ) -> Result<f64, StoreError> {
        let inner = &*self.inner;
        let now = inner.now_ms();
        let routes = inner.routes.lock().unwrap_or_else(|e| e.into_inner());
        let Some(replicas) = routes.get(&(namespace.into(), route.into())) else {
            return Ok(0.0);
        };
        Ok(replicas
            .values()
            .filter(|e| inner.seen_within_ttl(e.last_seen_ms, now))
            .map(|e| match window {
                Some(w) => window::reduce(&e.history, now, w).unwrap_or(e.value),
                None => e.value,
            })
            .fold(0.0, |a, v| a + v))
    }

    async fn pods(
        &self,
        namespace: &str,
        selector: Option<&PodSelector>,
    ) -> Result<Vec<PodView>, StoreError> {
        self.answer_pods(namespace, selector, None).await
    }

    async fn answer_pods(
        &self,
        namespace: &str,
        selector: Option<&PodSelector>,
        window: Option<Window>,
    ) -> Result<Vec<PodView>, StoreError> {
        let inner = &*self.inner;
        let now = inner.now_ms();
        let namespaces = inner.namespaces.read().unwrap_or_else(|e| e.into_inner());
        let Some(pods) = namespaces.get(namespace) else {
            return Ok(Vec::new());
        };
        let mut views: Vec<PodView> = pods
            .values()
            .filter(|p| inner.is_live(p, now) && selector.is_none_or(|s| s.matches(&p.identity)))
            .map(|p| PodView {
                identity: (*p.identity).clone(),
                // The same reduction as `each_value`: a windowed read per pod
                // agrees with a windowed trigger over the same pods.
                value: match window {
                    Some(w) => window::reduce(&p.history, now, w).unwrap_or(p.value),
                    None => p.value,
                },
                families: p
                    .families
                    .iter()
                    .map(|(n, v)| (n.to_string(), *v))
                    .collect(),
                age: Duration::from_millis(now.saturating_sub(p.last_seen_ms)),
                replica: Some(Arc::clone(&p.replica)),
            })
            .collect();
        views.sort_by(|a, b| a.identity.name.cmp(&b.identity.name));
        Ok(views)
    }

    fn watch(&self, namespace: &str) -> watch::Receiver<u64> {
        self.inner.notifier.subscribe(namespace)
    }

    async fn ready(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn tracked_pods(&self) -> Option<u64> {
        let namespaces = self
            .inner
            .namespaces
            .read()
            .unwrap_or_else(|e| e.into_inner());
        Some(namespaces.values().map(|p| p.len() as u64).sum())
    }
}

/// Merges `update` into `families`, both sorted by name without repeats:
/// names present take the new value, new names are added while the pod holds
/// fewer than `cap`, in name order. Returns how many new names were refused.
/// One walk over both when no name is new (every flush of a steady pod,
/// without allocating); a second one to insert otherwise.
fn merge(
    families: &mut Vec<(Arc<str>, f64)>,
    update: &[(String, f64)],
    cap: usize,
    mut intern: impl FnMut(&str) -> Arc<str>,
) -> u64 {
    let mut new = 0usize;
    let mut i = 0;
    for (name, value) in update {
        while i < families.len() && *families[i].0 < **name {
            i += 1;
        }
        match families.get_mut(i) {
            Some(slot) if *slot.0 == **name => slot.1 = *value,
            _ => new += 1,
        }
    }
    if new == 0 {
        return 0;
    }
    let room = cap.saturating_sub(families.len()).min(new);
    let mut merged = Vec::with_capacity(families.len() + room);
    // The old list, moved out; every element is moved back or kept.
    let mut old = std::mem::take(families).into_iter().peekable();
    let mut refused = 0;
    for (name, value) in update {
        while let Some(f) = old.next_if(|f| *f.0 < **name) {
            merged.push(f);
        }
        if old.peek().is_some_and(|f| *f.0 == **name) {
            // Updated in the first walk.
            merged.extend(old.next());
        } else if merged.len() + old.len() < cap {
            merged.push((intern(name), *value));
        } else {
            refused += 1;
        }
    }
    merged.extend(old);
    *families = merged;
    refused
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{selector::Selector, testkit::app_pod};

    fn query(ns: &str, app: &str) -> PodQuery {
        PodQuery {
            namespace: ns.into(),
            selector: PodSelector::Labels(Selector::parse(&format!("app={app}")).unwrap()),
            window: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn expiry_wakes_watchers_and_frees_the_pod() {
        let store = MemoryStore::new(Duration::from_secs(15), Duration::from_secs(60));
        let mut rx = store.watch("ns");
        store
            .record(&app_pod("ns", "p1", "web"), &[("f".into(), 2.0)])
            .await
            .unwrap();
        rx.changed().await.unwrap();
        assert_eq!(store.values(&query("ns", "web")).await.unwrap(), vec![2.0]);
        // Nothing else happens until the sweeper sees the pod expire.
        rx.changed().await.unwrap();
        assert!(store.values(&query("ns", "web")).await.unwrap().is_empty());
        assert_eq!(store.tracked_pods(), Some(0));
        assert!(Instant::now() - store.inner.origin >= Duration::from_secs(15));
    }

    #[tokio::test(start_paused = true)]
    async fn memoised_selector_agrees_with_plain_matching() {
        let store = MemoryStore::new(Duration::from_secs(15), Duration::from_secs(60));
        // More label sets than the memo holds, interleaved.
        for i in 0..100 {
            let app = format!("app-{}", i % 40);
            store
                .record(&app_pod("ns", &format!("p{i}"), &app), &[("f".into(), 1.0)])
                .await
                .unwrap();
        }
        for app in ["app-0", "app-17", "app-39", "none"] {
            let want = (0..100)
                .filter(|i| format!("app-{}", i % 40) == app)
                .count();
            assert_eq!(
                store.values(&query("ns", app)).await.unwrap().len(),
                want,
                "{app}"
            );
        }
        let q = PodQuery {
            namespace: "ns".into(),
            selector: PodSelector::Workload("app-3".into()),
            window: None,
        };
        assert_eq!(store.values(&q).await.unwrap().len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn label_sets_are_shared_between_pods() {
        let store = MemoryStore::new(Duration::from_secs(15), Duration::from_secs(60));
        store
            .record(&app_pod("ns", "p1", "web"), &[])
            .await
            .unwrap();
        store
            .record(&app_pod("ns", "p2", "web"), &[])
            .await
            .unwrap();
        assert_eq!(store.inner.labels.lock().unwrap().len(), 1);
        store
            .record(&app_pod("ns", "p1", "web"), &[("f".into(), 1.0)])
            .await
            .unwrap();
        store
            .record(&app_pod("ns", "p2", "web"), &[("f".into(), 2.0)])
            .await
            .unwrap();
        // The family name and the replica's.
        assert_eq!(store.inner.names.lock().unwrap().len(), 2);
        let namespaces = store.inner.namespaces.read().unwrap();
        let pods = &namespaces["ns"];
        assert!(Arc::ptr_eq(
            &pods["p1"].identity.labels,
            &pods["p2"].identity.labels
        ));
        assert!(Arc::ptr_eq(&pods["p1"].replica, &pods["p2"].replica));
    }

    fn intern(name: &str) -> Arc<str> {
        name.into()
    }

    fn names(f: &[(Arc<str>, f64)]) -> Vec<(&str, f64)> {
        f.iter().map(|(n, v)| (&**n, *v)).collect()
    }

    fn update(f: &[(&str, f64)]) -> Vec<(String, f64)> {
        f.iter().map(|(n, v)| (n.to_string(), *v)).collect()
    }

    #[test]
    fn merge_updates_in_place_and_adds_new_names_up_to_the_cap() {
        let mut f: Vec<(Arc<str>, f64)> = vec![("b".into(), 1.0), ("d".into(), 2.0)];
        let refused = merge(
            &mut f,
            &update(&[("a", 5.0), ("b", 3.0), ("c", 1.0), ("e", 1.0)]),
            4,
            intern,
        );
        assert_eq!(refused, 1, "e: the pod holds 4");
        assert_eq!(
            names(&f),
            vec![("a", 5.0), ("b", 3.0), ("c", 1.0), ("d", 2.0)]
        );
        // Known names only: updated where they are, nothing allocated.
        let before = f.as_ptr();
        assert_eq!(
            merge(&mut f, &update(&[("c", 9.0), ("d", 0.0)]), 4, intern),
            0
        );
        assert_eq!(f.as_ptr(), before);
        assert_eq!(
            names(&f),
            vec![("a", 5.0), ("b", 3.0), ("c", 9.0), ("d", 0.0)]
        );
        // Over the cap (a lowered setting): held names still update.
        assert_eq!(
            merge(&mut f, &update(&[("a", 1.0), ("z", 1.0)]), 2, intern),
            1
        );
        assert_eq!(f.len(), 4);
    }

    proptest::proptest! {
        /// Against a map: known names update, new ones enter in name order
        /// while there is room.
        #[test]
        fn merge_agrees_with_a_map(
            old in proptest::collection::btree_map("[a-h]", 0u32..5, 0..6),
            new in proptest::collection::btree_map("[a-h]", 0u32..5, 0..8),
            cap in 1usize..8,
        ) {
            let mut f: Vec<(Arc<str>, f64)> =
                old.iter().map(|(n, v)| (Arc::from(n.as_str()), f64::from(*v))).collect();
            let u: Vec<(String, f64)> = new.iter().map(|(n, v)| (n.clone(), f64::from(*v))).collect();
            let refused = merge(&mut f, &u, cap, intern);
            let mut want = old.clone();
            let mut want_refused = 0;
            for (n, v) in &new {
                if want.contains_key(n) || want.len() < cap {
                    want.insert(n.clone(), *v);
                } else {
                    want_refused += 1;
                }
            }
            let got: Vec<(String, u32)> = f.iter().map(|(n, v)| (n.to_string(), *v as u32)).collect();
            proptest::prop_assert_eq!(got, want.into_iter().collect::<Vec<_>>());
            proptest::prop_assert_eq!(refused, want_refused);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_live_pod_stays_bound_to_its_first_address() {
        let store = MemoryStore::new(Duration::from_secs(15), Duration::from_secs(60));
        let p = app_pod("ns", "p1", "web");
        let (a, b): (IpAddr, IpAddr) = ([10, 0, 0, 1].into(), [10, 0, 0, 2].into());
        let at = |peer, v: f64| {
            let families = vec![("f".to_string(), v)];
            let store = store.clone();
            let p = p.clone();
            async move {
                store
                    .ingest(&Ingest {
                        pod: &p,
                        families: &families,
                        peer,
                        max_families: 64,
                        replica: "r",
                    })
                    .await
                    .unwrap()
            }
        };
        assert_eq!(at(Some(a), 10.0).await, Ingested::Stored { refused: 0 });
        assert_eq!(
            at(Some(b), 0.0).await,
            Ingested::BoundElsewhere { bound: a }
        );
        assert_eq!(at(None, 3.0).await, Ingested::Stored { refused: 0 });
        assert_eq!(store.values(&query("ns", "web")).await.unwrap(), vec![3.0]);
        // New labels from another address are no way around it either.
        let relabelled = app_pod("ns", "p1", "api");
        let families = vec![("f".to_string(), 1.0)];
        let ingest = Ingest {
            pod: &relabelled,
            families: &families,
            peer: Some(b),
            max_families: 64,
            replica: "r",
        };
        assert_eq!(
            store.ingest(&ingest).await.unwrap(),
            Ingested::BoundElsewhere { bound: a }
        );
        tokio::time::advance(Duration::from_secs(15)).await;
        // Expired: the name is free for the next address.
        assert_eq!(at(Some(b), 7.0).await, Ingested::Stored { refused: 0 });
        assert_eq!(
            at(Some(a), 1.0).await,
            Ingested::BoundElsewhere { bound: b }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_store_warming_up_says_how_long_until_it_is_not() {
        let store = MemoryStore::new(Duration::from_secs(15), Duration::from_secs(60));
        assert_eq!(store.warming_up(), None, "no warm-up unless asked");
        let store = store.warming_up_for(Duration::from_secs(10));
        assert_eq!(store.warming_up(), Some(Duration::from_secs(10)));
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(store.warming_up(), Some(Duration::from_secs(6)));
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(store.warming_up(), None);
    }
}
