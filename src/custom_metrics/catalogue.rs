//! The metrics the API serves, built once from the config: `active_requests`,
//! the windowed forms the operator lists (`active_requests_max_30s`), and the
//! Prometheus rules. Each is listed in discovery as `pods/<name>`.

use std::{collections::HashMap, sync::Arc, time::Duration};

use crate::{
    config::{self, ACTIVE_REQUESTS, Config, ConfigError, WindowFunction},
    store::{Window, WindowReduce},
};

use super::rules::PromRule;

/// One metric of the catalogue.
#[derive(Debug)]
pub struct MetricDef {
    /// As in the URL and in discovery.
    pub name: String,
    pub kind: MetricKind,
}

/// Where a metric's values come from.
#[derive(Debug)]
pub enum MetricKind {
    /// Each pod's requests in flight as its sidecar reports them, now
    /// (`window: None`) or reduced over a window.
    ActiveRequests { window: Option<Window> },
    /// A Prometheus rule.
    Prometheus(PromRule),
}

impl MetricDef {
    /// `windowSeconds` (v1beta2) / `window` (v1beta1) of the items, for the
    /// metrics computed over a window.
    pub fn window_seconds(&self) -> Option<i64> {
        let window = match &self.kind {
            MetricKind::ActiveRequests { window } => window.map(|w| w.length),
            MetricKind::Prometheus(rule) => rule.window,
        };
        window.map(|w| i64::try_from(w.as_secs()).unwrap_or(i64::MAX))
    }

    /// Whether values carry metric labels a `metricLabelSelector` can select
    /// on. The sidecar metrics have none.
    pub fn has_metric_labels(&self) -> bool {
        matches!(self.kind, MetricKind::Prometheus(_))
    }
}

/// Every metric served, in discovery order.
#[derive(Debug)]
pub struct Catalogue {
    metrics: Vec<Arc<MetricDef>>,
    by_name: HashMap<String, Arc<MetricDef>>,
}

impl Catalogue {
    /// The catalogue `config` describes. Checks what `Config::validate`
    /// cannot: each rule's query with the PromQL guard (call it before
    /// anything binds).
    pub fn from_config(config: &Config) -> Result<Self, ConfigError> {
        let mut metrics = vec![MetricDef {
            name: ACTIVE_REQUESTS.into(),
            kind: MetricKind::ActiveRequests { window: None },
        }];
        for spec in &config.custom_metrics.windows {
            let (function, length) = config::parse_custom_metrics_window(spec)
                .map_err(|why| ConfigError(format!("custom_metrics_windows: {why}")))?;
            metrics.push(MetricDef {
                name: format!("{ACTIVE_REQUESTS}_{spec}"),
                kind: MetricKind::ActiveRequests {
                    window: Some(window(function, length)),
                },
            });
        }
        for (i, rule) in config.custom_metrics.rules.iter().enumerate() {
            let compiled = PromRule::compile(rule, config.prometheus.enforce_namespace)
                .map_err(|why| ConfigError(format!("custom_metrics_rules[{i}].query: {why}")))?
                .with_default_timeout(config.prometheus.default_timeout);
            metrics.push(MetricDef {
                name: rule.name.clone(),
                kind: MetricKind::Prometheus(compiled),
            });
        }
        Self::new(metrics)
    }

    fn new(metrics: Vec<MetricDef>) -> Result<Self, ConfigError> {
        let metrics: Vec<Arc<MetricDef>> = metrics.into_iter().map(Arc::new).collect();
        let mut by_name = HashMap::new();
        for m in &metrics {
            if by_name.insert(m.name.clone(), m.clone()).is_some() {
                return Err(ConfigError(format!(
                    "custom_metrics_rules: metric {:?} is defined twice",
                    m.name
                )));
            }
        }
        Ok(Self { metrics, by_name })
    }

    pub fn get(&self, name: &str) -> Option<&Arc<MetricDef>> {
        self.by_name.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<MetricDef>> {
        self.metrics.iter()
    }
}

fn window(function: WindowFunction, length: Duration) -> Window {
    Window {
        length,
        reduce: match function {
            WindowFunction::Max => WindowReduce::Max,
            WindowFunction::Avg => WindowReduce::Avg,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CustomMetricsRule, PodsFrom};

    fn rule(name: &str, query: &str) -> CustomMetricsRule {
        CustomMetricsRule {
            name: name.into(),
            server: "http://prometheus:9090".into(),
            query: query.into(),
            pod_label: "pod".into(),
            window: Some(Duration::from_secs(120)),
            pods_from: PodsFrom::Prometheus,
            timeout: None,
        }
    }

    #[test]
    fn active_requests_windows_and_rules_in_order() {
        let mut config = Config::default();
        config.custom_metrics.windows = vec!["max_30s".into(), "avg_2m".into()];
        config.custom_metrics.rules = vec![rule(
            "http_requests_per_second",
            "sum by (<<.GroupBy>>) (rate(http_requests_total{<<.LabelMatchers>>}[2m]))",
        )];
        config.validate().unwrap();
        let c = Catalogue::from_config(&config).unwrap();
        let names: Vec<&str> = c.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "active_requests",
                "active_requests_max_30s",
                "active_requests_avg_2m",
                "http_requests_per_second"
            ]
        );
        let max = c.get("active_requests_max_30s").unwrap();
        assert_eq!(max.window_seconds(), Some(30));
        assert!(matches!(
            max.kind,
            MetricKind::ActiveRequests {
                window: Some(Window {
                    reduce: WindowReduce::Max,
                    ..
                })
            }
        ));
        assert_eq!(c.get("active_requests").unwrap().window_seconds(), None);
        assert_eq!(
            c.get("http_requests_per_second").unwrap().window_seconds(),
            Some(120)
        );
        assert!(
            c.get("http_requests_per_second")
                .unwrap()
                .has_metric_labels()
        );
        assert!(!c.get("active_requests").unwrap().has_metric_labels());
        assert!(c.get("nope").is_none());
    }

    #[test]
    fn a_rule_query_the_guard_refuses_names_the_rule() {
        let mut config = Config::default();
        config.custom_metrics.rules = vec![
            rule("ok", "sum by (pod) (up{<<.LabelMatchers>>})"),
            rule("broken", "sum by (pod) (up{<<.LabelMatchers>>}"),
        ];
        let e = Catalogue::from_config(&config).unwrap_err().to_string();
        assert!(e.contains("custom_metrics_rules[1].query"), "{e}");
    }
}
