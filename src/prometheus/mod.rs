//! Prometheus backend for `source: prometheus` triggers (issue #4).
//!
//! Interface stub: the scaler and trigger parser depend on exactly these names.

use std::time::Duration;

use crate::trigger::{Metadata, MetadataError};

/// Service-wide settings of the Prometheus backend (from [`crate::config::Config`]).
#[derive(Clone, Debug, PartialEq)]
pub struct PromSettings {
    pub enforce_namespace: bool,
    pub cache_ttl: Duration,
    pub poll_interval: Duration,
    pub default_timeout: Duration,
}

impl Default for PromSettings {
    fn default() -> Self {
        Self {
            enforce_namespace: true,
            cache_ttl: Duration::from_secs(2),
            poll_interval: Duration::from_secs(5),
            default_timeout: Duration::from_secs(5),
        }
    }
}

/// A parsed prometheus-source trigger.
#[derive(Clone, Debug, PartialEq)]
pub struct PromTrigger {}

/// What [`PromTrigger::parse`] yields: the trigger and the defaults its preset gives.
pub struct ParsedProm {
    pub trigger: PromTrigger,
    pub default_target: Option<f64>,
    pub default_metric_name: &'static str,
}

impl PromTrigger {
    /// Metadata keys of the prometheus source (besides the common ones).
    pub const KEYS: &'static [&'static str] = &[];
    /// Key prefixes of the prometheus source (`query.<name>`).
    pub const KEY_PREFIXES: &'static [&'static str] = &[];

    pub fn parse(
        _meta: &Metadata<'_>,
        _namespace: &str,
        _settings: &PromSettings,
    ) -> Result<ParsedProm, MetadataError> {
        Err(MetadataError::Conflict(
            "source `prometheus` is not built yet".into(),
        ))
    }
}

/// Failures of a Prometheus read; none is ever turned into a value.
#[derive(Debug, thiserror::Error)]
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

/// Runs prometheus-source triggers, with a short result cache.
#[derive(Clone, Default)]
pub struct PromBackend {}

impl PromBackend {
    pub fn new(_settings: PromSettings) -> Self {
        Self {}
    }

    /// The trigger's current value.
    pub async fn value(&self, _trigger: &PromTrigger) -> Result<f64, PromError> {
        Err(PromError::Unavailable("not built yet".into()))
    }
}
