//! Prometheus backend for `source: prometheus` triggers: what queries
//! Prometheus. The trigger keys are parsed by [`crate::source::prometheus`]
//! into a [`PromTrigger`]; [`PromBackend`] runs it.
//!
//! - [`formula`]: the safe arithmetic language of `formula`.
//! - [`presets`]: the named worker formulas of `preset`.
//! - [`promql`]: PromQL checks and namespace injection, done at parse time.
//! - [`client`]: HTTP, TLS, credentials, result cache and single-flight.
//! - [`files`]: the files trigger keys name (`caCert`, credential files), read
//!   only inside the namespace's credentials directory.
//!
//! A trigger is parsed once: every query is checked and rewritten then, so a
//! bad one is `INVALID_ARGUMENT` on the first `GetMetricSpec`. At query time a trigger is
//! one or more instant queries and, for presets and formulas, a formula over
//! their results. Nothing that fails becomes a number: every failure is a
//! [`PromError`] the scaler turns into a gRPC status.

pub mod client;
pub mod files;
pub mod formula;
pub mod presets;
pub mod promql;

use std::sync::Arc;

use client::{Connections, Endpoint, Outcome};
use formula::Formula;

/// Default of `prometheus_credentials_dir` (see [`files`] for what is
/// refused inside it).
pub use crate::config::PROMETHEUS_CREDENTIALS_DIR as CREDENTIALS_DIR;

/// Default of `prometheus_max_response_bytes`.
pub use crate::config::PROMETHEUS_MAX_RESPONSE_BYTES as MAX_RESPONSE_BYTES;

/// Service-wide settings of the Prometheus backend: its group of the config.
pub use crate::config::PrometheusConfig as PromSettings;

/// A parsed prometheus-source trigger: where to ask, what to ask (already
/// checked and rewritten), and how to combine the answers.
#[derive(Clone, Debug, PartialEq)]
///
/// Only [`crate::source::prometheus`] builds one, after checking every part.
pub struct PromTrigger {
    pub(crate) endpoint: Arc<Endpoint>,
    /// (name, query as sent); one entry for `query`.
    pub(crate) queries: Vec<(String, String)>,
    /// Over the answers of `queries`, in order; `None` for a single `query`.
    pub(crate) formula: Option<Formula>,
    /// An empty answer counts as 0 instead of being an error.
    pub(crate) ignore_null: bool,
}

/// What makes two prometheus triggers read the same value: the endpoint
/// (server, TLS, credentials, timeout), the queries as sent, the formula and
/// `ignoreNullValues`. A feed is shared per key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PromKey {
    endpoint: Arc<Endpoint>,
    queries: Vec<(String, String)>,
    /// The parsed formula's canonical form (it holds floats, which do not hash).
    formula: Option<String>,
    ignore_null: bool,
}

impl PromTrigger {
    /// This trigger's [`PromKey`].
    pub fn feed_key(&self) -> PromKey {
        PromKey {
            endpoint: self.endpoint.clone(),
            queries: self.queries.clone(),
            formula: self.formula.as_ref().map(|f| format!("{f:?}")),
            ignore_null: self.ignore_null,
        }
    }

    /// The queries as they are sent, by name.
    pub fn queries(&self) -> impl Iterator<Item = (&str, &str)> {
        self.queries.iter().map(|(n, q)| (n.as_str(), q.as_str()))
    }
}

/// Failures of a Prometheus read; none is ever turned into a value.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PromError {
    /// Unreachable, HTTP error, timeout.
    #[error("prometheus unavailable: {0}")]
    Unavailable(String),
    /// The query returned no series (and `ignoreNullValues` is not set).
    #[error("prometheus returned no data: {0}")]
    Empty(String),
    /// NaN, ±Inf, a division by zero in a formula, more than one series.
    #[error("prometheus value unusable: {0}")]
    BadValue(String),
    /// The server rejected the query.
    #[error("prometheus rejected the query: {0}")]
    Rejected(String),
}

/// Runs prometheus-source triggers, with a short result cache; clones share it.
#[derive(Clone)]
pub struct PromBackend {
    connections: Arc<Connections>,
}

impl Default for PromBackend {
    fn default() -> Self {
        Self::new(PromSettings::default())
    }
}

impl PromBackend {
    pub fn new(settings: PromSettings) -> Self {
        Self {
            connections: Arc::new(Connections::new(
                settings.cache_ttl,
                settings.max_response_bytes,
            )),
        }
    }

    /// As [`PromBackend::new`], counting the requests it sends in `queries`.
    pub fn counted(
        settings: PromSettings,
        queries: prometheus_client::metrics::family::Family<
            crate::telemetry::OutcomeLabel,
            prometheus_client::metrics::counter::Counter,
        >,
    ) -> Self {
        Self {
            connections: Arc::new(
                Connections::new(settings.cache_ttl, settings.max_response_bytes).counted(queries),
            ),
        }
    }

    /// Every series of one instant query at `endpoint`, through the same
    /// cache, single-flight, timeouts and size limit as trigger queries (for
    /// the Custom Metrics API's per-pod rules).
    pub async fn series(
        &self,
        endpoint: &Arc<Endpoint>,
        query: &str,
    ) -> Result<Arc<[client::Series]>, PromError> {
        self.connections.query_series(endpoint, query).await
    }

    /// The trigger's current value. The queries of a formula run concurrently.
    pub async fn value(&self, trigger: &PromTrigger) -> Result<f64, PromError> {
        let answers = futures::future::join_all(
            trigger
                .queries
                .iter()
                .map(|(_, q)| self.connections.query(&trigger.endpoint, q)),
        )
        .await;
        let mut values = Vec::with_capacity(answers.len());
        for ((name, query), answer) in trigger.queries.iter().zip(answers) {
            let answer = answer.map_err(|e| match (&trigger.formula, e) {
                (Some(_), PromError::BadValue(m)) => PromError::BadValue(format!("`{name}`: {m}")),
                (_, e) => e,
            })?;
            values.push(match answer {
                Outcome::Value(v) => v,
                Outcome::Empty if trigger.ignore_null => 0.0,
                Outcome::Empty => {
                    return Err(PromError::Empty(format!(
                        "`{name}` ({query}) returned no series; set ignoreNullValues: \"true\" to count that as 0"
                    )));
                }
            });
        }
        match &trigger.formula {
            None => Ok(values.first().copied().unwrap_or_default()),
            Some(f) => f
                .eval(&values)
                .map_err(|e| PromError::BadValue(format!("formula: {e}"))),
        }
    }
}
