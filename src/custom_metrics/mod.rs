//! The Custom Metrics API (`custom.metrics.k8s.io`, v1beta1 and v1beta2), so
//! a plain HPA (`type: Pods`, `metric: {name: active_requests}`) scales on the
//! same per-pod numbers KEDA gets.
//!
//! # Layout
//!
//! ```text
//!  kube-apiserver ──HTTPS, front-proxy cert, X-Remote-*──▶ server ─▶ api ──PodMetricSource──▶ engine
//!  (aggregator)                                            (tls, auth)  (paths, Status)          (EngineSource)
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
//! formats them. [`EngineSource`] implements it over the engine.

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

/// The engine's per-pod values as the API's source: `active_requests` now
/// or over a window (the store reduces it), and the Prometheus rules (one
/// query per request through the engine's Prometheus backend, cached and
/// single-flight like trigger queries).
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
        match &query.metric.kind {
            MetricKind::ActiveRequests { window } => self.sidecars(query, *window).await,
            MetricKind::Prometheus(rule) => {
                let result = self.rule(query, rule).await;
                self.record_rule(query, &result);
                result
            }
        }
    }
}

impl EngineSource {
    /// The sidecars' values: now, or reduced over `window` by the store.
    async fn sidecars(
        &self,
        query: &PodQuery<'_>,
        window: Option<crate::store::Window>,
    ) -> Result<Vec<PodSample>, SourceError> {
        let selector = match query.pods {
            PodScope::Matching(s) => s.cloned().map(crate::store::PodSelector::Labels),
            PodScope::Named(_) => None,
        };
        let pods = self
            .engine
            .pods(query.namespace, selector.as_ref(), window, asker(query))
            .await
            .map_err(engine_error)?;
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

    /// Records a rule's answer for the live view, as the engine records the
    /// sidecar metrics' answers.
    fn record_rule(&self, query: &PodQuery<'_>, result: &Result<Vec<PodSample>, SourceError>) {
        let asker = asker(query);
        if !self.engine.records(&asker) {
            return;
        }
        let now = SystemTime::now();
        let readings: Result<Vec<crate::engine::PodReading>, _> = result.as_ref().map(|pods| {
            pods.iter()
                .map(|p| crate::engine::PodReading {
                    name: p.name.clone(),
                    value: p.value,
                    age: now.duration_since(p.last_report).unwrap_or_default(),
                })
                .collect()
        });
        let selector = match query.pods {
            PodScope::Matching(s) => s.cloned().map(crate::store::PodSelector::Labels),
            PodScope::Named(_) => None,
        };
        self.engine.record_pods(
            &asker,
            query.namespace,
            selector.as_ref(),
            readings.as_deref().map_err(|e| e as &dyn std::fmt::Display),
        );
    }

    /// One query of `rule` for the request, its series mapped to pods.
    async fn rule(
        &self,
        query: &PodQuery<'_>,
        rule: &rules::PromRule,
    ) -> Result<Vec<PodSample>, SourceError> {
        use crate::config::PodsFrom;
        let (pod, pod_selector) = match query.pods {
            PodScope::Named(name) => (Some(name), None),
            PodScope::Matching(s) => (None, s),
        };
        let scope = rules::RuleScope {
            namespace: query.namespace,
            pod,
            // `pods_from: sidecars` selects the pods below, not in PromQL.
            pod_selector: pod_selector.filter(|_| rule.pods_from == PodsFrom::Prometheus),
            metric_selector: query.metric_selector,
        };
        let promql = rule.query(&scope).map_err(|e| match e {
            rules::RuleError::Selector(why) => SourceError::Invalid(why),
            e @ rules::RuleError::Query(_) => SourceError::Failed(e.to_string()),
        })?;
        let span = tracing::debug_span!(
            "custom_metrics_rule",
            metric = %query.metric.name,
            namespace = query.namespace,
            server = %rule.server,
        );
        let series = tracing::Instrument::instrument(
            self.engine.prometheus().series(&rule.endpoint, &promql),
            span,
        )
        .await
        .map_err(|e| match e {
            // A query that cannot give one series per pod is the rule's
            // fault, not Prometheus' state.
            crate::prometheus::PromError::BadValue(_) => SourceError::Failed(e.to_string()),
            e => SourceError::Unavailable(e.to_string()),
        })?;
        let mut pods = rules::pods_of(&series, &rule.pod_label).map_err(SourceError::Failed)?;
        if rule.pods_from == PodsFrom::Sidecars
            && let PodScope::Matching(selector) = query.pods
        {
            let selector = selector.cloned().map(crate::store::PodSelector::Labels);
            let live = self
                .engine
                .pods(
                    query.namespace,
                    selector.as_ref(),
                    None,
                    crate::engine::Asker::Unrecorded,
                )
                .await
                .map_err(engine_error)?;
            let names = live.into_iter().map(|p| p.name).collect();
            rules::keep_only(&mut pods, &names);
        }
        Ok(pods)
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

fn engine_error(e: crate::engine::EvalError) -> SourceError {
    match e {
        crate::engine::EvalError::WarmingUp(left) => SourceError::WarmingUp(left),
        e => SourceError::Unavailable(e.to_string()),
    }
}
