//! A parsed trigger: what a ScaledObject's `external`/`external-push`
//! trigger asks for, parsed and validated once.
//!
//! This module reads the keys every trigger has (`targetValue`,
//! `activationValue`, `metricName`, `source`) and checks the ScaledObject's
//! namespace; the `source` key hands the rest to one of [`crate::source`]'s
//! parsers, and [`crate::metadata`] reads the keys.
//!
//! KEDA sends the trigger's `metadata` map with every call, and its metrics
//! server calls `GetMetricSpec` on every HPA read, so parsed triggers are
//! cached by (namespace, name, metadata): a hot call costs one hash and one
//! map comparison. Every refusal names the key, the value and what would have
//! been accepted; the scaler turns it into `INVALID_ARGUMENT`.

use std::{
    collections::HashMap,
    hash::BuildHasher,
    sync::{Arc, RwLock},
};

use crate::{
    metadata::{self, KEDA_CLIENT_KEYS, Metadata, MetadataError, NAMESPACE_NAME},
    source::{self, Source},
};

pub use crate::source::TriggerSettings;

/// A parsed trigger.
#[derive(Clone, Debug, PartialEq)]
pub struct Trigger {
    /// Name returned by GetMetricSpec (KEDA prefixes it with `sN-`).
    pub metric_name: String,
    /// Per-replica target (`targetValue`).
    pub target: f64,
    /// Active when the value is above this (`activationValue`).
    pub activation: f64,
    pub source: Source,
}

/// Keys every source understands.
const COMMON_KEYS: &[&str] = &["source", "targetValue", "activationValue", "metricName"];

/// Parses a trigger of a ScaledObject in `namespace`.
pub fn parse(
    namespace: &str,
    metadata: &HashMap<String, String>,
    settings: &TriggerSettings,
) -> Result<Trigger, MetadataError> {
    // First: it names Redis keys, credential directories and PromQL matchers.
    check_reference_namespace(namespace)?;
    let resolved;
    let metadata = if metadata.keys().any(|k| k.ends_with(metadata::FROM_ENV)) {
        resolved = metadata::resolve_from_env(metadata)?;
        &resolved
    } else {
        metadata
    };
    let meta = Metadata(metadata);
    let kind = source::kind(&meta)?;
    let activation = meta
        .number("activationValue", Some((0.0, false)))?
        .unwrap_or(0.0);
    let metric_name = metric_name(&meta)?;
    let target = meta.number("targetValue", Some((0.0, true)))?;
    meta.reject_unknown(
        &[COMMON_KEYS, kind.keys, KEDA_CLIENT_KEYS],
        kind.key_prefixes,
    )?;
    let parsed = (kind.parse)(&meta, namespace, settings, target)?;
    Ok(Trigger {
        metric_name: metric_name.unwrap_or_else(|| parsed.default_metric_name.to_owned()),
        target: parsed.target,
        activation,
        source: parsed.source,
    })
}

/// The ScaledObject's own namespace, as KEDA's `ScaledObjectRef` gives it.
fn check_reference_namespace(namespace: &str) -> Result<(), MetadataError> {
    if metadata::is_namespace_name(namespace) {
        return Ok(());
    }
    Err(MetadataError::Reference {
        field: "namespace".into(),
        value: namespace.into(),
        expected: NAMESPACE_NAME.into(),
    })
}

/// `metricName`, when given.
fn metric_name(meta: &Metadata<'_>) -> Result<Option<String>, MetadataError> {
    match meta.get("metricName") {
        Some(name) if !is_metric_name(name) => Err(MetadataError::invalid(
            "metricName",
            name,
            "1-200 characters of letters, digits, '_', '-', '.' or ':'",
        )),
        name => Ok(name.map(str::to_owned)),
    }
}

fn is_metric_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 200
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

/// Parsed triggers by (namespace, name, metadata).
pub struct TriggerCache {
    settings: TriggerSettings,
    capacity: usize,
    hasher: std::collections::hash_map::RandomState,
    // std RwLock: lookups are a hash probe, never across an await.
    entries: RwLock<HashMap<u64, Vec<Entry>>>,
}

struct Entry {
    namespace: String,
    name: String,
    metadata: HashMap<String, String>,
    trigger: Arc<Trigger>,
}

impl TriggerCache {
    pub fn new(settings: TriggerSettings, capacity: usize) -> Self {
        Self {
            settings,
            capacity,
            hasher: Default::default(),
            entries: RwLock::default(),
        }
    }

    pub fn settings(&self) -> &TriggerSettings {
        &self.settings
    }

    /// The parsed trigger for this ScaledObject trigger, parsing on first sight.
    pub fn get(
        &self,
        namespace: &str,
        name: &str,
        metadata: &HashMap<String, String>,
    ) -> Result<Arc<Trigger>, MetadataError> {
        let key = self.key(namespace, name, metadata);
        {
            let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
            if let Some(bucket) = entries.get(&key)
                && let Some(e) = bucket
                    .iter()
                    .find(|e| e.namespace == namespace && e.name == name && e.metadata == *metadata)
            {
                return Ok(Arc::clone(&e.trigger));
            }
        }
        let trigger = Arc::new(parse(namespace, metadata, &self.settings)?);
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= self.capacity {
            // Triggers change rarely; a full cache means churn (edited
            // ScaledObjects), so starting over is simpler than LRU bookkeeping.
            entries.clear();
        }
        entries.entry(key).or_default().push(Entry {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            metadata: metadata.clone(),
            trigger: Arc::clone(&trigger),
        });
        Ok(trigger)
    }

    /// Order-independent hash of the reference: no sorting, no allocation.
    fn key(&self, namespace: &str, name: &str, metadata: &HashMap<String, String>) -> u64 {
        let mut acc = self.hasher.hash_one((namespace, name));
        for pair in metadata {
            acc = acc.wrapping_add(self.hasher.hash_one(pair));
        }
        acc
    }

    /// Number of cached triggers.
    pub fn len(&self) -> usize {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        entries.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        source::{envoy::Aggregation, tests::settings},
        store::{PodSelector, Window, WindowReduce},
        testkit::meta,
    };

    fn ok(pairs: &[(&str, &str)]) -> Trigger {
        parse("shop", &meta(pairs), &settings()).unwrap()
    }

    fn err(pairs: &[(&str, &str)]) -> String {
        parse("shop", &meta(pairs), &settings())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn minimal_envoy_trigger_and_defaults() {
        let t = ok(&[
            ("scalerAddress", "activescale.keda:9090"),
            ("labelSelector", "app=web,ticker=abc"),
            ("targetValue", "10"),
        ]);
        assert_eq!(t.metric_name, "active_requests");
        assert_eq!(t.target, 10.0);
        assert_eq!(t.activation, 0.0);
        let Source::Envoy { query, aggregation } = t.source else {
            panic!("envoy source expected")
        };
        assert_eq!(aggregation, Aggregation::Sum);
        assert_eq!(query.namespace, "shop");
        assert_eq!(query.window, None);
    }

    #[test]
    fn every_option() {
        let t = ok(&[
            ("workload", "web"),
            ("targetValue", "2.5"),
            ("activationValue", "1"),
            ("aggregation", "AVG"),
            ("metricName", "web_inflight"),
            ("window", "30s"),
            ("windowAggregation", "avg"),
        ]);
        assert_eq!(
            (t.target, t.activation, t.metric_name.as_str()),
            (2.5, 1.0, "web_inflight")
        );
        let Source::Envoy { query, aggregation } = t.source else {
            panic!()
        };
        assert_eq!(aggregation, Aggregation::Avg);
        assert_eq!(query.selector, PodSelector::Workload("web".into()));
        assert_eq!(
            query.window,
            Some(Window {
                length: Duration::from_secs(30),
                reduce: WindowReduce::Avg
            })
        );
    }

    #[test]
    fn every_error_names_key_value_and_expectation() {
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);
        let cases: &[Case] = &[
            (
                &[("labelSelector", "app=web")],
                &["targetValue", "required"],
            ),
            (
                &[("labelSelector", "app=web"), ("targetValue", "abc")],
                &["targetValue", "\"abc\"", "greater than 0"],
            ),
            (
                &[("labelSelector", "app=web"), ("targetValue", "0")],
                &["targetValue", "\"0\""],
            ),
            (
                &[("labelSelector", "app=web"), ("targetValue", "-1")],
                &["targetValue"],
            ),
            (
                &[("labelSelector", "app=web"), ("targetValue", "NaN")],
                &["targetValue", "NaN"],
            ),
            (
                &[("labelSelector", "app=web"), ("targetValue", "inf")],
                &["targetValue"],
            ),
            (
                &[("targetValue", "1")],
                &["labelSelector", "required", "workload"],
            ),
            (
                &[
                    ("labelSelector", "app=web"),
                    ("workload", "w"),
                    ("targetValue", "1"),
                ],
                &["labelSelector", "workload", "not both"],
            ),
            (
                &[("labelSelector", "app in (x"), ("targetValue", "1")],
                &["labelSelector", "app in (x", "label selector"],
            ),
            (
                &[
                    ("labelSelector", "a"),
                    ("targetValue", "1"),
                    ("activationValue", "-2"),
                ],
                &["activationValue", "-2", "at least 0"],
            ),
            (
                &[
                    ("labelSelector", "a"),
                    ("targetValue", "1"),
                    ("aggregation", "median"),
                ],
                &["aggregation", "median", "sum, max, avg"],
            ),
            (
                &[
                    ("labelSelector", "a"),
                    ("targetValue", "1"),
                    ("window", "soon"),
                ],
                &["window", "soon", "duration"],
            ),
            (
                &[
                    ("labelSelector", "a"),
                    ("targetValue", "1"),
                    ("window", "2h"),
                ],
                &["window", "2h", "10m"],
            ),
            (
                &[
                    ("labelSelector", "a"),
                    ("targetValue", "1"),
                    ("window", "0s"),
                ],
                &["window"],
            ),
            (
                &[
                    ("labelSelector", "a"),
                    ("targetValue", "1"),
                    ("windowAggregation", "avg"),
                ],
                &["windowAggregation", "window"],
            ),
            (
                &[
                    ("labelSelector", "a"),
                    ("targetValue", "1"),
                    ("windowAggregation", "p99"),
                    ("window", "1m"),
                ],
                &["windowAggregation", "p99", "max, avg"],
            ),
            (
                &[
                    ("labelSelector", "a"),
                    ("targetValue", "1"),
                    ("metricName", "bad name!"),
                ],
                &["metricName", "bad name!"],
            ),
            (
                &[
                    ("labelSelector", "a"),
                    ("targetValue", "1"),
                    ("source", "kafka"),
                ],
                &["source", "kafka", "envoy, prometheus"],
            ),
            (
                &[
                    ("labelSelector", "a"),
                    ("targetValue", "1"),
                    ("targetvalue", "1"),
                ],
                &["targetvalue", "not a known key", "targetValue"],
            ),
            (
                &[
                    ("labelSelector", "a"),
                    ("targetValue", "1"),
                    ("namespace", "other"),
                ],
                &["namespace", "other", "allow_cross_namespace"],
            ),
        ];
        for (pairs, needles) in cases {
            let e = err(pairs);
            for n in *needles {
                assert!(e.contains(n), "{pairs:?}: {e:?} should mention {n:?}");
            }
        }
    }

    #[test]
    fn namespaces_that_are_not_names_are_refused_naming_field_and_value() {
        let envoy = meta(&[("labelSelector", "a"), ("targetValue", "1")]);
        let prom = meta(&[
            ("source", "prometheus"),
            ("serverAddress", "http://prometheus:9090"),
            ("query", "sum(up)"),
            ("targetValue", "1"),
        ]);
        for m in [&envoy, &prom] {
            for ns in ["..", "a/b", "Shop", "sh\nop", ""] {
                let e = parse(ns, m, &settings()).unwrap_err();
                assert!(matches!(e, MetadataError::Reference { .. }), "{e:?}");
                let text = e.to_string();
                for needle in [
                    "ScaledObjectRef",
                    "`namespace`",
                    &format!("{ns:?}"),
                    "RFC 1123",
                ] {
                    assert!(text.contains(needle), "{text:?} should mention {needle:?}");
                }
                assert!(!text.contains('\n'), "the value is escaped: {text:?}");
            }
        }
        let mut cross = settings();
        cross.allow_cross_namespace = true;
        for allowed in [settings(), cross] {
            for ns in ["..", "a/b", "Other", "sh\nop"] {
                let mut m = envoy.clone();
                m.insert("namespace".into(), ns.into());
                let e = parse("shop", &m, &allowed).unwrap_err();
                assert!(matches!(e, MetadataError::Invalid { .. }), "{ns:?}: {e:?}");
                let text = e.to_string();
                for needle in ["`namespace`", &format!("{ns:?}"), "RFC 1123"] {
                    assert!(text.contains(needle), "{text:?} should mention {needle:?}");
                }
            }
        }
    }

    #[test]
    fn own_namespace_is_always_allowed_and_cross_namespace_when_enabled() {
        let t = ok(&[
            ("labelSelector", "a"),
            ("targetValue", "1"),
            ("namespace", "shop"),
        ]);
        assert!(matches!(t.source, Source::Envoy { query, .. } if query.namespace == "shop"));
        let mut s = settings();
        s.allow_cross_namespace = true;
        let t = parse(
            "shop",
            &meta(&[
                ("labelSelector", "a"),
                ("targetValue", "1"),
                ("namespace", "other"),
            ]),
            &s,
        )
        .unwrap();
        assert!(matches!(t.source, Source::Envoy { query, .. } if query.namespace == "other"));
    }

    #[test]
    fn keys_resolved_from_env_by_keda_count_as_the_key() {
        let t = ok(&[("labelSelector", "app=web"), ("targetValueFromEnv", "7")]);
        assert_eq!(t.target, 7.0);
        let e = err(&[
            ("labelSelector", "a"),
            ("targetValue", "1"),
            ("targetValueFromEnv", "2"),
        ]);
        assert!(
            e.contains("targetValueFromEnv") && e.contains("not both"),
            "{e}"
        );
    }

    #[test]
    fn cache_parses_once_and_distinguishes_metadata() {
        let cache = TriggerCache::new(settings(), 100);
        let m1 = meta(&[("labelSelector", "app=web"), ("targetValue", "10")]);
        let a = cache.get("shop", "so", &m1).unwrap();
        let b = cache.get("shop", "so", &m1.clone()).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        let m2 = meta(&[("labelSelector", "app=web"), ("targetValue", "11")]);
        let c = cache.get("shop", "so", &m2).unwrap();
        assert_eq!(c.target, 11.0);
        let d = cache.get("other", "so", &m1).unwrap();
        assert!(!Arc::ptr_eq(&a, &d));
        assert_eq!(cache.len(), 3);
        assert!(
            cache
                .get("shop", "so", &meta(&[("targetValue", "1")]))
                .is_err()
        );
        assert_eq!(cache.len(), 3, "errors are not cached");
    }

    #[test]
    fn cache_is_bounded() {
        let cache = TriggerCache::new(settings(), 2);
        for i in 0..5 {
            let m = meta(&[
                ("labelSelector", "app=web"),
                ("targetValue", &format!("{}", i + 1)),
            ]);
            cache.get("shop", "so", &m).unwrap();
        }
        assert!(cache.len() <= 2);
    }
}
