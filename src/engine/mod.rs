//! The evaluation engine: what a parsed trigger's value is now, and a feed of
//! its changes, for every front end alike (KEDA's gRPC scaler, the Custom
//! Metrics API, the live view).
//!
//! [`Engine::value`] reads once. [`Engine::watch`] joins the one feed of a
//! distinct query, whatever its source: the first watcher starts it, every
//! other shares its reads, and it stops with its last watcher. Envoy feeds
//! read on the store's change signal (and every second for windowed queries,
//! whose values age out with time alone); Prometheus feeds poll at
//! `prometheus_poll_interval`. A feed whose read fails publishes "unknown"
//! (`None`) and retries: watchers stay silent rather than hear a number that
//! may be false.
//!
//! Warm-up is the store's to say ([`Store::warming_up`](crate::store::Store::warming_up)):
//! until then every store-backed answer is [`EvalError::WarmingUp`], so no
//! front end needs to know which store it has.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    activator::RouteSet,
    prometheus::{PromBackend, PromError, PromKey, PromTrigger},
    source::{Source, activator::RouteRef, envoy::Aggregation},
    store::{PodQuery, PodSelector, SharedStore, StoreError, Window},
    telemetry::Metrics,
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

    /// The source's value now.
    pub async fn value(&self, source: &Source) -> Result<f64, EvalError> {
        match source {
            Source::Envoy { query, aggregation } => self.envoy(query, *aggregation).await,
            Source::Prometheus(p) => self.prom(p).await,
            Source::Activator(r) => Ok(self.route(r)?.load() as f64),
        }
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
    /// trigger reduces it: for front ends that answer per pod.
    pub async fn pods(
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
    pub fn watch(&self, source: &Source) -> watch::Receiver<Reading> {
        let key = match source {
            Source::Envoy { query, aggregation } => FeedKey::Envoy(query.clone(), *aggregation),
            Source::Prometheus(p) => FeedKey::Prometheus(p.feed_key()),
            Source::Activator(r) => FeedKey::Activator(r.clone()),
        };
        self.subscribe(key, source)
    }
}
