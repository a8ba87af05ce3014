//! Where a trigger's value comes from: one module per source, each owning its
//! metadata keys and its parser, and the [`Source`] they parse into.
//!
//! - [`envoy`]: requests in flight reported by Envoy sidecars (the default).
//! - [`prometheus`]: a Prometheus query, preset or formula; the backend that
//!   runs it is [`crate::prometheus`].
//! - [`activator`]: requests held or forwarded by a route of the activator.
//!
//! The `source` key picks one of [`KINDS`]. Adding a source is adding a
//! module with its [`Kind`], an entry in [`KINDS`] and an arm of [`Source`].

pub mod activator;
pub mod envoy;
pub mod prometheus;

use std::time::Duration;

use crate::{
    metadata::{Metadata, MetadataError},
    prometheus::{PromSettings, PromTrigger},
    store::PodQuery,
};

use envoy::Aggregation;

/// Where a trigger's value comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    /// Requests in flight reported by Envoy sidecars.
    Envoy {
        query: PodQuery,
        aggregation: Aggregation,
    },
    /// A Prometheus query, preset or formula.
    Prometheus(Box<PromTrigger>),
    /// Pending plus active requests of an activator route.
    Activator(activator::RouteRef),
}

/// Settings from the service config that bound what a trigger may ask.
#[derive(Clone, Debug)]
pub struct TriggerSettings {
    pub max_window: Duration,
    pub allow_cross_namespace: bool,
    pub prometheus: PromSettings,
}

/// What a source's parser yields: the source, and what it settles of the
/// keys every trigger has.
#[derive(Debug)]
pub struct Parsed {
    pub source: Source,
    /// `targetValue`, or the source's default when it has one.
    pub target: f64,
    /// The metric name when `metricName` is not given.
    pub default_metric_name: &'static str,
}

/// One source as the metadata sees it: its keys and its parser.
pub struct Kind {
    /// Keys of this source, besides the ones every trigger has.
    pub keys: &'static [&'static str],
    /// Key prefixes of this source (`query.<name>`).
    pub key_prefixes: &'static [&'static str],
    /// Parses a trigger of a ScaledObject in the namespace given; the
    /// `Option<f64>` is the `targetValue` already read.
    pub parse:
        fn(&Metadata<'_>, &str, &TriggerSettings, Option<f64>) -> Result<Parsed, MetadataError>,
}

/// The sources by their `source` value; the first is the default.
pub const KINDS: &[(&str, &Kind)] = &[
    ("envoy", &envoy::KIND),
    ("prometheus", &prometheus::KIND),
    ("activator", &activator::KIND),
];

/// The source the `source` key names.
pub fn kind(meta: &Metadata<'_>) -> Result<&'static Kind, MetadataError> {
    Ok(meta.choice("source", KINDS)?.unwrap_or(KINDS[0].1))
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;

    use super::*;

    pub fn settings() -> TriggerSettings {
        TriggerSettings {
            max_window: Duration::from_secs(600),
            allow_cross_namespace: false,
            prometheus: PromSettings::default(),
        }
    }

    #[test]
    fn the_source_key_picks_a_kind_envoy_by_default() {
        let pick = |pairs: &[(&str, &str)]| {
            let m: HashMap<String, String> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            kind(&Metadata(&m)).map(|k| k.keys)
        };
        assert_eq!(pick(&[]), Ok(envoy::KEYS));
        assert_eq!(pick(&[("source", "Envoy")]), Ok(envoy::KEYS));
        assert_eq!(pick(&[("source", "prometheus")]), Ok(prometheus::KEYS));
        let e = pick(&[("source", "kafka")]).unwrap_err().to_string();
        assert!(e.contains("one of envoy, prometheus, activator"), "{e}");
    }
}
