//! The evaluation engine: what a parsed trigger's value is now, and a feed of
//! its changes, for every front end alike (KEDA's gRPC scaler, the Custom
//! Metrics API, the live view).
//!
//! [`Engine::value`] reads once. [`Engine::watch`] joins the one feed of a
//! distinct query, whatever its source: the first watcher starts it, every
//! other shares its reads, and it stops with its last watcher. Envoy feeds
//! read on the store's change signal (and every second for windowed queries,
//! whose values age out with time alone); activator feeds read on the same
//! signal (the replicas' publishers write into the store) and every second
//! (a dead replica's count expires with time alone); Prometheus feeds poll at
//! `prometheus_poll_interval`. A feed whose read fails publishes "unknown"
//! (`None`) and retries: watchers stay silent rather than hear a number that
//! may be false.
//!
//! Every front end says who asks ([`Asker`]): the engine reports each ask,
//! answer, error and StreamIsActive push to its [`Record`] (the live view
//! implements it), so the view shows KEDA's and the HPA's questions alike
//! and no front end keeps hooks of its own. Without a `Record` (the view is
//! off) nothing is built or locked per call: the asker is borrowed.
//!
//! Warm-up is the store's to say ([`Store::warming_up`](crate::store::Store::warming_up)):
//! until then every store-backed answer is [`EvalError::WarmingUp`], so no
//! front end needs to know which store it has.

use std::{collections::HashMap, sync::Arc, time::Duration};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    activator::RouteSet,
    prometheus::{PromBackend, PromError, PromKey, PromTrigger},
    source::{Source, activator::RouteRef, envoy::Aggregation},
    store::{PodQuery, PodSelector, SharedStore, StoreError, Window},
    telemetry::Metrics,
    trigger::Trigger,
};

mod feed;

pub use feed::Reading;

/// Why a value is unknown. None of these is ever answered as a number.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Prometheus(#[from] PromError),
    #[error("warming up: envoy-source answers start in {0:?}, once sidecars have reconnected")]
    WarmingUp(Duration),
    /// No activator route of the trigger's namespace has this host and
    /// prefix (or the activator is off).
    #[error(
        "no activator route for host {host:?} (pathPrefix {prefix:?}) in namespace {namespace}{why}"
    )]
    NoRoute {
        host: String,
        prefix: Option<String>,
        namespace: String,
        why: &'static str,
    },
}

/// What a feed reads; two triggers with equal keys have equal values.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum FeedKey {
    Envoy(PodQuery, Aggregation),
    Prometheus(PromKey),
    Activator(RouteRef),
}

impl FeedKey {
    fn namespace(&self) -> Option<&str> {
        match self {
            FeedKey::Envoy(q, _) => Some(&q.namespace),
            FeedKey::Prometheus(_) => None,
            FeedKey::Activator(r) => Some(&r.namespace),
        }
    }
}

/// One live pod's value now.
#[derive(Clone, Debug, PartialEq)]
pub struct PodReading {
    pub name: String,
    pub value: f64,
    /// Since its sidecar last reported.
    pub age: Duration,
}

/// Who asks the engine, for the [`Record`]. Borrowed from the request, so
/// building one costs nothing when nobody records.
#[derive(Clone, Copy, Debug)]
pub enum Asker<'a> {
    /// KEDA, about one trigger of a ScaledObject.
    Keda {
        namespace: &'a str,
        scaled_object: &'a str,
        trigger: &'a Trigger,
        /// The trigger's metadata: the view echoes a Prometheus query from
        /// it (the parsed form keeps it private).
        metadata: &'a HashMap<String, String>,
    },
    /// An HPA through the Custom Metrics API, for `metric` of the pods a
    /// selector matches, or of the one pod named.
    Hpa {
        metric: &'a str,
        pod: Option<&'a str>,
    },
    /// Nobody to show: tests and tools.
    Unrecorded,
}

/// Where the engine reports what it was asked and answered: the live view.
/// Called on the request's task: implementations must not block (a map
/// operation under a std lock at most).
pub trait Record: Send + Sync + 'static {
    /// `asker` asked for a value and was answered `answer`.
    fn value(&self, asker: &Asker<'_>, answer: Result<f64, &EvalError>);
    /// `asker` asked for the pods of `namespace` matching `selector` (every
    /// pod when `None`) and was answered `answer`.
    fn pods(
        &self,
        asker: &Asker<'_>,
        namespace: &str,
        selector: Option<&PodSelector>,
        answer: Result<&[PodReading], &dyn std::fmt::Display>,
    );
    /// `asker` opened a watch; the activity changes it yields go to the
    /// returned log (`None`: not recorded).
    fn watch(&self, asker: &Asker<'_>) -> Option<Box<dyn PushLog>>;
}

/// The pushes of one watch, as recorded.
pub trait PushLog: Send + Sync {
    fn pushed(&self, active: bool);
}

/// One watcher's view of a shared feed: the activity state (`value >
/// activation`) each time it changes, recorded as it is yielded.
pub struct Activity {
    feed: watch::Receiver<Reading>,
    activation: f64,
    /// The state last yielded: never yielded twice in a row (KEDA treats
    /// every `true` as fresh activity).
    last: Option<bool>,
    log: Option<Box<dyn PushLog>>,
}

impl Activity {
    /// The next state that differs from the last one yielded: the first
    /// known state, then each change. Silent while the value is unknown.
    /// `None` when the feed has ended. Cancel-safe (no state changes across
    /// an await), so it can sit in a `select!`.
    pub async fn changed(&mut self) -> Option<bool> {
        loop {
            let reading = *self.feed.borrow_and_update();
            if let Some(active) = next_state(reading, self.activation, self.last) {
                self.last = Some(active);
                if let Some(log) = &self.log {
                    log.pushed(active);
                }
                return Some(active);
            }
            self.feed.changed().await.ok()?;
        }
    }
}

/// The state to yield for `reading` after `last`, if any: none while the
/// value is unknown or the state is unchanged.
fn next_state(reading: Reading, activation: f64, last: Option<bool>) -> Option<bool> {
    let active = reading? > activation;
    (last != Some(active)).then_some(active)
}

/// The engine; clones share everything (feeds included).
#[derive(Clone)]
pub struct Engine {
    store: SharedStore,
    prometheus: PromBackend,
    /// How often a Prometheus feed re-reads (`prometheus_poll_interval`).
    poll_interval: Duration,
    metrics: Arc<Metrics>,
    feeds: Arc<feed::Feeds>,
    shutdown: CancellationToken,
    /// The activator's routes, when it is on.
    routes: Option<RouteSet>,
    /// Where asks and answers are reported; `None` (the view is off): no
    /// work at all per call.
    record: Option<Arc<dyn Record>>,
}

impl Engine {
    pub fn new(
        store: SharedStore,
        prometheus: PromBackend,
        poll_interval: Duration,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            store,
            prometheus,
            poll_interval,
            metrics,
            feeds: Arc::default(),
            shutdown,
            routes: None,
            record: None,
        }
    }

    /// Reports every ask and answer to `record`.
    pub fn with_record(mut self, record: Arc<dyn Record>) -> Self {
        self.record = Some(record);
        self
    }

    /// The record, unless there is none or nobody is to be shown.
    fn record_for(&self, asker: &Asker<'_>) -> Option<&dyn Record> {
        match asker {
            Asker::Unrecorded => None,
            _ => self.record.as_deref(),
        }
    }

    /// Lets `source: activator` triggers read these routes.
    pub fn with_routes(mut self, routes: RouteSet) -> Self {
        self.routes = Some(routes);
        self
    }

    /// The route a trigger names, if it is of the trigger's namespace.
    pub(crate) fn route(&self, r: &RouteRef) -> Result<crate::activator::Route, EvalError> {
        let missing = |why| EvalError::NoRoute {
            host: r.host.clone(),
            prefix: r.path_prefix.clone(),
            namespace: r.namespace.clone(),
            why,
        };
        let routes = self
            .routes
            .as_ref()
            .ok_or_else(|| missing(" (the activator is off: activator_addr is unset)"))?;
        match routes.find(&r.host, r.path_prefix.as_deref()) {
            // Another namespace's route reads as none: its existence is not
            // the trigger's to learn.
            Some(route) if route.namespace() == r.namespace => Ok(route.clone()),
            _ => Err(missing("")),
        }
    }

    /// The source's value now, as `asker` asked it (recorded).
    pub async fn value(&self, source: &Source, asker: Asker<'_>) -> Result<f64, EvalError> {
        let result = self.read(source).await;
        if let Some(r) = self.record_for(&asker) {
            r.value(&asker, result.as_ref().copied());
        }
        result
    }

    /// The source's value now, unrecorded: the feeds' reads.
    async fn read(&self, source: &Source) -> Result<f64, EvalError> {
        match source {
            Source::Envoy { query, aggregation } => self.envoy(query, *aggregation).await,
            Source::Prometheus(p) => self.prom(p).await,
            Source::Activator(r) => self.activator(r).await,
        }
    }

    /// The route's load summed over every live activator replica, from the
    /// store: this process's own count alone would tell a replica that
    /// holds nothing "0" while another holds requests. Not subject to the
    /// store's warm-up: the replicas write these counts themselves, at start
    /// and whenever they change (a shared store that lost them says so).
    async fn activator(&self, r: &RouteRef) -> Result<f64, EvalError> {
        let route = self.route(r)?;
        Ok(self
            .store
            .route_load(route.namespace(), &route.store_key(), r.window)
            .await?)
    }

    async fn envoy(&self, query: &PodQuery, aggregation: Aggregation) -> Result<f64, EvalError> {
        if let Some(left) = self.store.warming_up() {
            return Err(EvalError::WarmingUp(left));
        }
        let s = self.store.summary(query, aggregation.needs_max()).await?;
        Ok(aggregation.of(&s))
    }

    async fn prom(&self, p: &PromTrigger) -> Result<f64, EvalError> {
        Ok(self.prometheus.value(p).await?)
    }

    /// Each live pod of `namespace` matching `selector` (every pod when
    /// `None`), with its value now, or reduced over `window` as a windowed
    /// trigger reduces it: for front ends that answer per pod. Recorded as
    /// `asker`'s.
    pub async fn pods(
        &self,
        namespace: &str,
        selector: Option<&PodSelector>,
        window: Option<Window>,
        asker: Asker<'_>,
    ) -> Result<Vec<PodReading>, EvalError> {
        let result = self.read_pods(namespace, selector, window).await;
        if let Some(r) = self.record_for(&asker) {
            let answer = result.as_deref().map_err(|e| e as &dyn std::fmt::Display);
            r.pods(&asker, namespace, selector, answer);
        }
        result
    }

    /// Whether answers given as `asker`'s are recorded: lets a front end skip
    /// building what [`Engine::record_pods`] would be given.
    pub fn records(&self, asker: &Asker<'_>) -> bool {
        self.record_for(asker).is_some()
    }

    /// Records a per-pod answer a front end computed through the engine's
    /// Prometheus backend (the Custom Metrics API's rules), as
    /// [`Engine::pods`] records its own.
    pub fn record_pods(
        &self,
        asker: &Asker<'_>,
        namespace: &str,
        selector: Option<&PodSelector>,
        answer: Result<&[PodReading], &dyn std::fmt::Display>,
    ) {
        if let Some(r) = self.record_for(asker) {
            r.pods(asker, namespace, selector, answer);
        }
    }

    async fn read_pods(
        &self,
        namespace: &str,
        selector: Option<&PodSelector>,
        window: Option<Window>,
    ) -> Result<Vec<PodReading>, EvalError> {
        if let Some(left) = self.store.warming_up() {
            return Err(EvalError::WarmingUp(left));
        }
        let pods = self.store.answer_pods(namespace, selector, window).await?;
        Ok(pods
            .into_iter()
            .map(|p| PodReading {
                name: p.identity.name,
                value: p.value,
                age: p.age,
            })
            .collect())
    }

    /// The Prometheus backend (its clients, cache and single-flight), for
    /// front ends that run their own queries through it.
    pub fn prometheus(&self) -> &PromBackend {
        &self.prometheus
    }

    /// The shared feed of the source's value, started if none runs. The
    /// receiver sees `None` until the first read succeeds and whenever the
    /// latest read failed.
    pub fn feed_of(&self, source: &Source) -> watch::Receiver<Reading> {
        let key = match source {
            Source::Envoy { query, aggregation } => FeedKey::Envoy(query.clone(), *aggregation),
            Source::Prometheus(p) => FeedKey::Prometheus(p.feed_key()),
            Source::Activator(r) => FeedKey::Activator(r.clone()),
        };
        self.subscribe(key, source)
    }

    /// `asker`'s watch of the source's activity (`value > activation`) on
    /// the shared feed: the ask is recorded now, each state it yields as a
    /// push.
    pub fn watch(&self, source: &Source, activation: f64, asker: Asker<'_>) -> Activity {
        Activity {
            feed: self.feed_of(source),
            activation,
            last: None,
            log: self.record_for(&asker).and_then(|r| r.watch(&asker)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::store::{PodQuery as StoreQuery, memory::MemoryStore};

    #[test]
    fn activity_yields_the_first_known_state_then_changes_only() {
        assert_eq!(next_state(None, 1.0, None), None, "unknown: silent");
        assert_eq!(next_state(Some(0.0), 1.0, None), Some(false));
        assert_eq!(next_state(Some(0.5), 1.0, Some(false)), None);
        assert_eq!(next_state(Some(2.0), 1.0, Some(false)), Some(true));
        assert_eq!(next_state(None, 1.0, Some(true)), None);
        assert_eq!(next_state(Some(1.0), 1.0, Some(true)), Some(false));
    }

    /// What the engine reported, as text.
    #[derive(Default)]
    struct Log(Arc<Mutex<Vec<String>>>);

    struct Pushes(Arc<Mutex<Vec<String>>>);

    impl PushLog for Pushes {
        fn pushed(&self, active: bool) {
            self.0.lock().unwrap().push(format!("push {active}"));
        }
    }

    fn who(a: &Asker<'_>) -> String {
        match a {
            Asker::Keda { scaled_object, .. } => format!("keda {scaled_object}"),
            Asker::Hpa { metric, pod } => format!("hpa {metric} {pod:?}"),
            Asker::Unrecorded => "nobody".into(),
        }
    }

    impl Record for Log {
        fn value(&self, a: &Asker<'_>, answer: Result<f64, &EvalError>) {
            let answer = answer.map_err(|e| e.to_string());
            self.0
                .lock()
                .unwrap()
                .push(format!("{} {answer:?}", who(a)));
        }
        fn pods(
            &self,
            a: &Asker<'_>,
            namespace: &str,
            _: Option<&PodSelector>,
            answer: Result<&[PodReading], &dyn std::fmt::Display>,
        ) {
            let n = answer.map(<[_]>::len).map_err(|e| e.to_string());
            self.0
                .lock()
                .unwrap()
                .push(format!("{} {namespace} {n:?}", who(a)));
        }
        fn watch(&self, a: &Asker<'_>) -> Option<Box<dyn PushLog>> {
            self.0.lock().unwrap().push(format!("{} watch", who(a)));
            Some(Box::new(Pushes(self.0.clone())))
        }
    }

    fn engine(warmup: Option<Duration>) -> (Engine, Arc<Mutex<Vec<String>>>) {
        let store = MemoryStore::new(Duration::from_secs(15), Duration::from_secs(60));
        let store: SharedStore = match warmup {
            Some(w) => Arc::new(store.warming_up_for(w)),
            None => Arc::new(store),
        };
        let metrics = Arc::new(Metrics::default());
        let prom = PromBackend::default();
        let log = Log::default();
        let seen = log.0.clone();
        let e = Engine::new(
            store,
            prom,
            Duration::from_secs(1),
            metrics,
            CancellationToken::new(),
        )
        .with_record(Arc::new(log));
        (e, seen)
    }

    fn envoy() -> Trigger {
        Trigger {
            metric_name: "active_requests".into(),
            target: 10.0,
            activation: 0.0,
            source: Source::Envoy {
                query: StoreQuery {
                    namespace: "shop".into(),
                    selector: PodSelector::Workload("web".into()),
                    window: None,
                },
                aggregation: Aggregation::Sum,
            },
        }
    }

    #[tokio::test]
    async fn asks_answers_errors_and_pushes_are_recorded_unless_unrecorded() {
        let (e, seen) = engine(None);
        let t = envoy();
        let md = HashMap::new();
        let keda = Asker::Keda {
            namespace: "shop",
            scaled_object: "web",
            trigger: &t,
            metadata: &md,
        };
        assert_eq!(e.value(&t.source, keda).await.unwrap(), 0.0);
        e.value(&t.source, Asker::Unrecorded).await.unwrap();
        let hpa = Asker::Hpa {
            metric: "active_requests",
            pod: None,
        };
        e.pods("shop", None, None, hpa).await.unwrap();
        let mut w = e.watch(&t.source, t.activation, keda);
        assert_eq!(w.changed().await, Some(false));
        assert_eq!(
            *seen.lock().unwrap(),
            [
                "keda web Ok(0.0)",
                "hpa active_requests None shop Ok(0)",
                "keda web watch",
                "push false",
            ]
        );

        let (e, seen) = engine(Some(Duration::from_secs(3600)));
        assert!(e.value(&t.source, keda).await.is_err());
        assert!(e.pods("shop", None, None, hpa).await.is_err());
        let log = seen.lock().unwrap();
        assert!(log[0].starts_with("keda web Err(\"warming up"), "{log:?}");
        assert!(
            log[1].starts_with("hpa active_requests None shop Err(\"warming up"),
            "{log:?}"
        );
    }
}
