//! Trigger metadata: what a ScaledObject's `external`/`external-push` trigger
//! asks for, parsed and validated once.
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
    time::Duration,
};

use crate::{
    prometheus::{PromSettings, PromTrigger},
    selector::Selector,
    store::{PodQuery, PodSelector, Summary, Window, WindowReduce},
};

/// How per-pod values are combined into the trigger's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Aggregation {
    #[default]
    Sum,
    Max,
    Avg,
}

impl Aggregation {
    /// Reduces pod values. No pods is 0 for every form: nothing is in flight.
    pub fn apply(self, values: &[f64]) -> f64 {
        if values.is_empty() {
            return 0.0;
        }
        match self {
            Aggregation::Sum => values.iter().sum(),
            Aggregation::Max => values.iter().copied().fold(f64::MIN, f64::max),
            Aggregation::Avg => values.iter().sum::<f64>() / values.len() as f64,
        }
    }

    /// [`Aggregation::apply`] from a summary of the values.
    pub fn of(self, s: &Summary) -> f64 {
        if s.count == 0 {
            return 0.0;
        }
        match self {
            Aggregation::Sum => s.sum,
            Aggregation::Max => s.max,
            Aggregation::Avg => s.sum / s.count as f64,
        }
    }

    /// Whether [`Aggregation::of`] reads the summary's maximum.
    pub fn needs_max(self) -> bool {
        self == Aggregation::Max
    }
}

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
}

/// Settings from the service config that bound what a trigger may ask.
#[derive(Clone, Debug)]
pub struct TriggerSettings {
    pub max_window: Duration,
    pub allow_cross_namespace: bool,
    pub prometheus: PromSettings,
}

/// A refused trigger; shown to the user verbatim in KEDA's events.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum MetadataError {
    #[error("trigger metadata `{key}` is required: {expected}")]
    Missing { key: String, expected: String },
    #[error("trigger metadata `{key}` = {value:?} is not accepted: expected {expected}")]
    Invalid {
        key: String,
        value: String,
        expected: String,
    },
    #[error("trigger metadata `{key}` is not a known key; accepted keys: {accepted}")]
    Unknown { key: String, accepted: String },
    #[error("trigger metadata: {0}")]
    Conflict(String),
    #[error(
        "trigger metadata `namespace` = {0:?} reads another namespace; \
         the operator has not set allow_cross_namespace"
    )]
    CrossNamespace(String),
    /// A field of KEDA's `ScaledObjectRef` itself, not of the metadata.
    #[error("ScaledObjectRef `{field}` = {value:?} is not accepted: expected {expected}")]
    Reference {
        field: String,
        value: String,
        expected: String,
    },
}

impl MetadataError {
    pub fn invalid(key: &str, value: &str, expected: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.into(),
            value: value.into(),
            expected: expected.into(),
        }
    }

    pub fn missing(key: &str, expected: impl Into<String>) -> Self {
        Self::Missing {
            key: key.into(),
            expected: expected.into(),
        }
    }
}

/// Keys every source understands.
const COMMON_KEYS: &[&str] = &["source", "targetValue", "activationValue", "metricName"];
/// Keys of the envoy source.
const ENVOY_KEYS: &[&str] = &[
    "labelSelector",
    "workload",
    "aggregation",
    "window",
    "windowAggregation",
    "namespace",
];
/// Keys KEDA's own client reads (TLS towards the scaler); present in the map,
/// not ours to interpret.
const KEDA_CLIENT_KEYS: &[&str] = &[
    "scalerAddress",
    "enableTLS",
    "unsafeSsl",
    "caCert",
    "tlsClientCert",
    "tlsClientKey",
    "tlsCertFile",
];

/// Read access to a trigger's metadata with typed, self-describing errors.
pub struct Metadata<'a>(pub &'a HashMap<String, String>);

impl<'a> Metadata<'a> {
    /// The trimmed value of `key`; an empty value counts as absent.
    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.0.get(key).map(|v| v.trim()).filter(|v| !v.is_empty())
    }

    /// A finite number, optionally bounded below.
    pub fn number(
        &self,
        key: &str,
        min: Option<(f64, bool)>,
    ) -> Result<Option<f64>, MetadataError> {
        let Some(raw) = self.get(key) else {
            return Ok(None);
        };
        let expected = match min {
            Some((m, true)) => format!("a number greater than {m}"),
            Some((m, false)) => format!("a number of at least {m}"),
            None => "a number".into(),
        };
        let v: f64 = raw
            .parse()
            .ok()
            .filter(|v: &f64| v.is_finite())
            .ok_or_else(|| MetadataError::invalid(key, raw, &expected))?;
        match min {
            Some((m, true)) if v <= m => Err(MetadataError::invalid(key, raw, expected)),
            Some((m, false)) if v < m => Err(MetadataError::invalid(key, raw, expected)),
            _ => Ok(Some(v)),
        }
    }

    /// `true` / `false` (any case).
    pub fn boolean(&self, key: &str) -> Result<Option<bool>, MetadataError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) if v.eq_ignore_ascii_case("true") => Ok(Some(true)),
            Some(v) if v.eq_ignore_ascii_case("false") => Ok(Some(false)),
            Some(v) => Err(MetadataError::invalid(key, v, "true or false")),
        }
    }

    /// A humantime duration (`30s`, `2m`, `500ms`).
    pub fn duration(&self, key: &str) -> Result<Option<Duration>, MetadataError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => humantime::parse_duration(v)
                .map(Some)
                .map_err(|_| MetadataError::invalid(key, v, "a duration such as 30s, 2m or 500ms")),
        }
    }

    /// One of a fixed set of words.
    pub fn choice<T: Copy>(
        &self,
        key: &str,
        options: &[(&str, T)],
    ) -> Result<Option<T>, MetadataError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        options
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(v))
            .map(|(_, t)| Some(*t))
            .ok_or_else(|| {
                let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
                MetadataError::invalid(key, v, format!("one of {}", names.join(", ")))
            })
    }

    /// Rejects keys that are neither in `keys` nor start with one of `prefixes`.
    pub fn reject_unknown(&self, keys: &[&[&str]], prefixes: &[&str]) -> Result<(), MetadataError> {
        let mut unknown: Vec<&String> = self
            .0
            .keys()
            .filter(|k| {
                !keys.iter().any(|set| set.contains(&k.as_str()))
                    && !prefixes.iter().any(|p| k.starts_with(p))
            })
            .collect();
        unknown.sort();
        match unknown.first() {
            None => Ok(()),
            Some(key) => {
                let mut accepted: Vec<String> = keys
                    .iter()
                    .flat_map(|set| set.iter())
                    .filter(|k| !KEDA_CLIENT_KEYS.contains(k))
                    .map(|k| k.to_string())
                    .chain(prefixes.iter().map(|p| format!("{p}<name>")))
                    .collect();
                accepted.sort();
                Err(MetadataError::Unknown {
                    key: key.to_string(),
                    accepted: accepted.join(", "),
                })
            }
        }
    }
}

/// Parses a trigger of a ScaledObject in `namespace`.
pub fn parse(
    namespace: &str,
    metadata: &HashMap<String, String>,
    settings: &TriggerSettings,
) -> Result<Trigger, MetadataError> {
    // First: it names Redis keys, credential directories and PromQL matchers.
    if !is_namespace_name(namespace) {
        return Err(MetadataError::Reference {
            field: "namespace".into(),
            value: namespace.into(),
            expected: NAMESPACE_NAME.into(),
        });
    }
    let resolved;
    let metadata = if metadata.keys().any(|k| k.ends_with(FROM_ENV)) {
        resolved = resolve_from_env(metadata)?;
        &resolved
    } else {
        metadata
    };
    let meta = Metadata(metadata);
    let source = meta
        .choice("source", &[("envoy", false), ("prometheus", true)])?
        .unwrap_or(false);
    let activation = meta
        .number("activationValue", Some((0.0, false)))?
        .unwrap_or(0.0);
    let metric_name = meta.get("metricName").map(str::to_owned);
    if let Some(name) = &metric_name
        && !is_metric_name(name)
    {
        return Err(MetadataError::invalid(
            "metricName",
            name,
            "1-200 characters of letters, digits, '_', '-', '.' or ':'",
        ));
    }
    let target = meta.number("targetValue", Some((0.0, true)))?;

    if source {
        meta.reject_unknown(
            &[COMMON_KEYS, PromTrigger::KEYS, KEDA_CLIENT_KEYS],
            PromTrigger::KEY_PREFIXES,
        )?;
        let parsed = PromTrigger::parse(&meta, namespace, &settings.prometheus)?;
        let target = target.or(parsed.default_target).ok_or_else(|| {
            MetadataError::missing(
                "targetValue",
                "a number greater than 0 (the per-replica target)",
            )
        })?;
        return Ok(Trigger {
            metric_name: metric_name.unwrap_or_else(|| parsed.default_metric_name.to_string()),
            target,
            activation,
            source: Source::Prometheus(Box::new(parsed.trigger)),
        });
    }

    meta.reject_unknown(&[COMMON_KEYS, ENVOY_KEYS, KEDA_CLIENT_KEYS], &[])?;
    let target = target.ok_or_else(|| {
        MetadataError::missing(
            "targetValue",
            "a number greater than 0 (in-flight requests per replica)",
        )
    })?;
    let selector = match (meta.get("labelSelector"), meta.get("workload")) {
        (Some(_), Some(_)) => {
            return Err(MetadataError::Conflict(
                "give either `labelSelector` or `workload`, not both".into(),
            ));
        }
        (Some(s), None) => PodSelector::Labels(Selector::parse(s).map_err(|e| {
            MetadataError::invalid(
                "labelSelector",
                s,
                format!("a Kubernetes label selector ({e})"),
            )
        })?),
        (None, Some(w)) => PodSelector::Workload(w.to_owned()),
        (None, None) => {
            return Err(MetadataError::missing(
                "labelSelector",
                "a label selector such as `app=web` (or `workload` with a workload name)",
            ));
        }
    };
    let aggregation = meta
        .choice(
            "aggregation",
            &[
                ("sum", Aggregation::Sum),
                ("max", Aggregation::Max),
                ("avg", Aggregation::Avg),
            ],
        )?
        .unwrap_or_default();
    let window_reduce = meta.choice(
        "windowAggregation",
        &[("max", WindowReduce::Max), ("avg", WindowReduce::Avg)],
    )?;
    let window = match meta.duration("window")? {
        Some(length) if length.is_zero() || length > settings.max_window => {
            return Err(MetadataError::invalid(
                "window",
                meta.get("window").unwrap_or_default(),
                format!(
                    "a duration greater than 0 and at most {} (max_window)",
                    humantime::format_duration(settings.max_window)
                ),
            ));
        }
        Some(length) => Some(Window {
            length,
            reduce: window_reduce.unwrap_or_default(),
        }),
        None if window_reduce.is_some() => {
            return Err(MetadataError::Conflict(
                "`windowAggregation` needs a `window`".into(),
            ));
        }
        None => None,
    };
    let pods_namespace = match meta.get("namespace") {
        Some(ns) if !is_namespace_name(ns) => {
            return Err(MetadataError::invalid("namespace", ns, NAMESPACE_NAME));
        }
        Some(ns) if ns != namespace => {
            if !settings.allow_cross_namespace {
                return Err(MetadataError::CrossNamespace(ns.to_owned()));
            }
            ns.to_owned()
        }
        _ => namespace.to_owned(),
    };
    Ok(Trigger {
        metric_name: metric_name.unwrap_or_else(|| "active_requests".into()),
        target,
        activation,
        source: Source::Envoy {
            query: PodQuery {
                namespace: pods_namespace,
                selector,
                window,
            },
            aggregation,
        },
    })
}

/// KEDA resolves `<key>FromEnv: VAR` from the target's environment and passes
/// the value on under the `<key>FromEnv` name.
const FROM_ENV: &str = "FromEnv";

/// Renames `<key>FromEnv` to `<key>`; both forms of one key is an error.
fn resolve_from_env(
    metadata: &HashMap<String, String>,
) -> Result<HashMap<String, String>, MetadataError> {
    let mut out = HashMap::with_capacity(metadata.len());
    for (k, v) in metadata {
        let key = k
            .strip_suffix(FROM_ENV)
            .filter(|b| !b.is_empty())
            .unwrap_or(k);
        if key != k && metadata.contains_key(key) {
            return Err(MetadataError::Conflict(format!(
                "give either `{key}` or `{k}`, not both"
            )));
        }
        out.insert(key.to_owned(), v.clone());
    }
    Ok(out)
}

/// What [`is_namespace_name`] accepts, for error messages.
const NAMESPACE_NAME: &str = "a Kubernetes namespace name (RFC 1123 label: 1-63 characters of \
     a-z, 0-9 and '-', starting and ending with a letter or digit)";

/// A Kubernetes namespace name: an RFC 1123 label.
pub fn is_namespace_name(s: &str) -> bool {
    let b = s.as_bytes();
    let edge = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    (1..=63).contains(&b.len())
        && b.first().is_some_and(edge)
        && b.last().is_some_and(edge)
        && b.iter().all(|c| edge(c) || *c == b'-')
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
pub(crate) mod tests {
    use super::*;
    use crate::testkit::meta;

    pub fn settings() -> TriggerSettings {
        TriggerSettings {
            max_window: Duration::from_secs(600),
            allow_cross_namespace: false,
            prometheus: PromSettings::default(),
        }
    }

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
    fn namespace_names_are_rfc_1123_labels() {
        let long = "a".repeat(63);
        for good in ["a", "0", "shop", "team-a", "a1-b2", "1abc", long.as_str()] {
            assert!(is_namespace_name(good), "{good:?}");
        }
        let too_long = "a".repeat(64);
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "Shop",
            "shop\n",
            "-a",
            "a-",
            "a.b",
            "a_b",
            " a",
            "\u{e9}",
            too_long.as_str(),
        ] {
            assert!(!is_namespace_name(bad), "{bad:?}");
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
    fn aggregation_forms() {
        assert_eq!(Aggregation::Sum.apply(&[1.0, 2.0, 3.0]), 6.0);
        assert_eq!(Aggregation::Max.apply(&[1.0, 5.0, 3.0]), 5.0);
        assert_eq!(Aggregation::Avg.apply(&[1.0, 2.0, 3.0]), 2.0);
        for a in [Aggregation::Sum, Aggregation::Max, Aggregation::Avg] {
            assert_eq!(a.apply(&[]), 0.0);
        }
    }

    proptest::proptest! {
        #[test]
        fn aggregation_bounds(values in proptest::collection::vec(0.0f64..1e6, 1..50)) {
            let max = Aggregation::Max.apply(&values);
            let avg = Aggregation::Avg.apply(&values);
            let sum = Aggregation::Sum.apply(&values);
            let min = values.iter().copied().fold(f64::MAX, f64::min);
            proptest::prop_assert!(min <= avg + 1e-9 && avg <= max + 1e-9 && max <= sum + 1e-9);
            proptest::prop_assert!((avg * values.len() as f64 - sum).abs() <= 1e-6 * sum.max(1.0));
        }

        #[test]
        fn aggregation_of_a_summary_agrees_with_apply(
            values in proptest::collection::vec(-1e6f64..1e6, 0..50)
        ) {
            let s = Summary::of(&values);
            for a in [Aggregation::Sum, Aggregation::Max, Aggregation::Avg] {
                proptest::prop_assert_eq!(a.of(&s), a.apply(&values));
            }
        }
    }

    #[test]
    fn aggregation_of_no_pods_is_zero_whatever_the_max() {
        let s = Summary {
            count: 0,
            sum: 0.0,
            max: f64::MIN,
        };
        for a in [Aggregation::Sum, Aggregation::Max, Aggregation::Avg] {
            assert_eq!(a.of(&s), 0.0);
        }
        assert!(Aggregation::Max.needs_max());
        assert!(!Aggregation::Sum.needs_max() && !Aggregation::Avg.needs_max());
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
