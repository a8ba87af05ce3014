//! The Custom Metrics API (`custom.metrics.k8s.io`, v1beta1 and v1beta2), so
//! a plain HPA (`type: Pods`, `metric: {name: active_requests}`) scales on the
//! same per-pod numbers KEDA gets.
//!
//! # Layout
//!
//! ```text
//!  kube-apiserver ──HTTPS, front-proxy cert, X-Remote-*──▶ server ─▶ api ──PodMetricSource──▶ engine
//!  (aggregator)                                            (tls, auth)  (paths, Status)          (phase 2)
//! ```
//!
//! - [`types`]: the JSON objects, field for field as the Go types serialise.
//! - [`quantity`]: a value as a canonical Kubernetes quantity (`"1500m"`).
//! - [`catalogue`]: the metrics served: `active_requests`, its windowed
//!   forms, the Prometheus rules.
//! - [`rules`]: Prometheus rule templates (`<<.LabelMatchers>>`) turned into
//!   checked queries.
//! - [`auth`]: front-proxy authentication, as an aggregated API server does it.
//! - [`tls`]: the port's certificate (files reloaded on rotation, or made at
//!   start-up) and the client-certificate request.
//! - [`api`]: the router: discovery, the metric paths, every error as a
//!   Kubernetes `Status`.
//! - [`server`]: HTTPS with HTTP/1.1 and HTTP/2, bounded connections, drain.
//!
//! # The seam
//!
//! The API knows nothing of stores or Prometheus: it asks a
//! [`PodMetricSource`] for the samples of the pods a request names and
//! formats them. The engine implements it; until then the integration tests
//! bring a stand-in.

pub mod api;
pub mod auth;
pub mod catalogue;
pub mod quantity;
pub mod rules;
pub mod server;
pub mod tls;
pub mod types;

use std::time::{Duration, SystemTime};

use async_trait::async_trait;

pub use catalogue::{Catalogue, MetricDef, MetricKind};
pub use server::CustomMetricsApi;

use crate::selector::Selector;

/// Which pods of the namespace a request is about.
#[derive(Clone, Copy, Debug)]
pub enum PodScope<'a> {
    /// `pods/*`: the live pods matching the selector; `None`: every live pod
    /// of the namespace.
    Matching(Option<&'a Selector>),
    /// `pods/<name>`: that pod only.
    Named(&'a str),
}

/// What the API asks the source for.
#[derive(Clone, Copy, Debug)]
pub struct PodQuery<'a> {
    /// A valid namespace name.
    pub namespace: &'a str,
    pub pods: PodScope<'a>,
    /// The metric, from the [`Catalogue`].
    pub metric: &'a MetricDef,
    /// The request's `metricLabelSelector`. Only Prometheus rules have
    /// metric labels; for the sidecar metrics the API has already applied it
    /// (see [`api`]).
    pub metric_selector: Option<&'a Selector>,
}

/// One pod's value.
#[derive(Clone, Debug, PartialEq)]
pub struct PodSample {
    /// The pod's name.
    pub name: String,
    /// Finite and not negative; anything else is refused by the API, never
    /// served.
    pub value: f64,
    /// When the value was measured: the pod's last report, or the Prometheus
    /// sample's time.
    pub last_report: SystemTime,
}

/// Why a source has no answer. Never a number: the HPA keeps the current
/// size on an error, and would act on a wrong value.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The store or Prometheus cannot be reached now (503).
    #[error("{0}")]
    Unavailable(String),
    /// Just started: pods have not reported yet, an empty store is not "no
    /// load" (503, with `Retry-After`).
    #[error("warming up: answers start in {0:?}, once sidecars have reported")]
    WarmingUp(Duration),
    /// The request cannot be answered as asked, e.g. a selector term a
    /// Prometheus rule cannot express (400).
    #[error("{0}")]
    Invalid(String),
    /// Anything else (500).
    #[error("{0}")]
    Failed(String),
}

/// Where the API's values come from: the seam the engine implements.
///
/// Called once per request. Return only live pods of `query.namespace` (the
/// API also drops samples of other pods in the `Named` form and refuses
/// duplicates); an empty list is a valid answer ("no pods match") and is
/// served as one, so a failure must be an error.
#[async_trait]
pub trait PodMetricSource: Send + Sync + 'static {
    async fn pods(&self, query: &PodQuery<'_>) -> Result<Vec<PodSample>, SourceError>;
}

/// The engine's per-pod values as the API's source: `active_requests` now.
pub struct EngineSource {
    engine: crate::engine::Engine,
}

impl EngineSource {
    pub fn new(engine: crate::engine::Engine) -> Self {
        Self { engine }
    }
}

#[async_trait]
impl PodMetricSource for EngineSource {
    async fn pods(&self, query: &PodQuery<'_>) -> Result<Vec<PodSample>, SourceError> {
        use crate::{engine::EvalError, store::PodSelector};
        match &query.metric.kind {
            MetricKind::ActiveRequests { window: None } => {}
            // Refused at start-up by `run` (see `servable`); never answered
            // with a number the store cannot back.
            _ => {
                return Err(SourceError::Failed(format!(
                    "metric {} is not served by this build",
                    query.metric.name
                )));
            }
        }
        let selector = match query.pods {
            PodScope::Matching(s) => s.cloned().map(PodSelector::Labels),
            PodScope::Named(_) => None,
        };
        let pods = self
            .engine
            .pods(query.namespace, selector.as_ref(), asker(query))
            .await
            .map_err(|e| match e {
                EvalError::WarmingUp(left) => SourceError::WarmingUp(left),
                e => SourceError::Unavailable(e.to_string()),
            })?;
        let now = SystemTime::now();
        Ok(pods
            .into_iter()
            .filter(|p| match query.pods {
                PodScope::Named(name) => p.name == name,
                PodScope::Matching(_) => true,
            })
            .map(|p| PodSample {
                name: p.name,
                value: p.value,
                last_report: now.checked_sub(p.age).unwrap_or(now),
            })
            .collect())
    }
}

/// Who asks the engine: an HPA, for the metric and pods of `query` (the
/// live view shows it).
fn asker<'a>(query: &PodQuery<'a>) -> crate::engine::Asker<'a> {
    crate::engine::Asker::Hpa {
        metric: &query.metric.name,
        pod: match query.pods {
            PodScope::Named(name) => Some(name),
            PodScope::Matching(_) => None,
        },
    }
}

/// Refuses, naming the setting, what the served API cannot answer yet:
/// windowed forms and Prometheus rules need per-pod reads the engine does
/// not offer yet. Listing them in discovery and failing every request would
/// leave an HPA stuck without saying why.
pub fn servable(config: &crate::config::Config) -> Result<(), crate::config::ConfigError> {
    for (field, set) in [
        (
            "custom_metrics_windows",
            !config.custom_metrics.windows.is_empty(),
        ),
        (
            "custom_metrics_rules",
            !config.custom_metrics.rules.is_empty(),
        ),
    ] {
        if set {
            return Err(crate::config::ConfigError(format!(
                "{field}: not served yet with custom_metrics_addr (only active_requests is); \
                 leave it empty"
            )));
        }
    }
    Ok(())
}
