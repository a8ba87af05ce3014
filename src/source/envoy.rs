//! The `envoy` source (the default): requests in flight reported by Envoy
//! sidecars, read from the store for the pods a selector names.
//!
//! Keys: `labelSelector` or `workload` (which pods), `aggregation` (how their
//! values combine), `window` with `windowAggregation` (over how long), and
//! `namespace` (whose pods, when the operator allows another namespace).

use std::time::Duration;

use crate::{
    metadata::{self, Metadata, MetadataError, NAMESPACE_NAME},
    selector::Selector,
    store::{PodQuery, PodSelector, Summary, Window, WindowReduce},
};

use super::{Kind, Parsed, Source, TriggerSettings};

/// Keys of the envoy source.
pub const KEYS: &[&str] = &[
    "labelSelector",
    "workload",
    "aggregation",
    "window",
    "windowAggregation",
    "namespace",
];

/// The envoy source's entry in [`super::KINDS`].
pub const KIND: Kind = Kind {
    keys: KEYS,
    key_prefixes: &[],
    parse,
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

/// Parses the envoy keys of a trigger of a ScaledObject in `namespace`;
/// `target` is the `targetValue` already read.
fn parse(
    meta: &Metadata<'_>,
    namespace: &str,
    settings: &TriggerSettings,
    target: Option<f64>,
) -> Result<Parsed, MetadataError> {
    let target = target.ok_or_else(|| {
        MetadataError::missing(
            "targetValue",
            "a number greater than 0 (in-flight requests per replica)",
        )
    })?;
    let selector = selector(meta)?;
    let aggregation = aggregation(meta)?;
    let window = window(meta, settings.max_window)?;
    let namespace = pods_namespace(meta, namespace, settings.allow_cross_namespace)?;
    Ok(Parsed {
        source: Source::Envoy {
            query: PodQuery {
                namespace,
                selector,
                window,
            },
            aggregation,
        },
        target,
        default_metric_name: "active_requests",
    })
}

/// Which pods: `labelSelector` or `workload`, exactly one.
fn selector(meta: &Metadata<'_>) -> Result<PodSelector, MetadataError> {
    match (meta.get("labelSelector"), meta.get("workload")) {
        (Some(_), Some(_)) => Err(MetadataError::Conflict(
            "give either `labelSelector` or `workload`, not both".into(),
        )),
        (Some(s), None) => Ok(PodSelector::Labels(Selector::parse(s).map_err(|e| {
            MetadataError::invalid(
                "labelSelector",
                s,
                format!("a Kubernetes label selector ({e})"),
            )
        })?)),
        (None, Some(w)) => Ok(PodSelector::Workload(w.to_owned())),
        (None, None) => Err(MetadataError::missing(
            "labelSelector",
            "a label selector such as `app=web` (or `workload` with a workload name)",
        )),
    }
}

/// `aggregation`: how pod values combine; sum by default.
fn aggregation(meta: &Metadata<'_>) -> Result<Aggregation, MetadataError> {
    Ok(meta
        .choice(
            "aggregation",
            &[
                ("sum", Aggregation::Sum),
                ("max", Aggregation::Max),
                ("avg", Aggregation::Avg),
            ],
        )?
        .unwrap_or_default())
}

/// `window` (at most `max_window`) and `windowAggregation`, which needs it.
/// Shared with the activator source, whose keys are the same.
pub(super) fn window(
    meta: &Metadata<'_>,
    max_window: Duration,
) -> Result<Option<Window>, MetadataError> {
    let reduce = meta.choice(
        "windowAggregation",
        &[("max", WindowReduce::Max), ("avg", WindowReduce::Avg)],
    )?;
    match meta.duration("window")? {
        Some(length) if length.is_zero() || length > max_window => Err(MetadataError::invalid(
            "window",
            meta.get("window").unwrap_or_default(),
            format!(
                "a duration greater than 0 and at most {} (max_window)",
                humantime::format_duration(max_window)
            ),
        )),
        Some(length) => Ok(Some(Window {
            length,
            reduce: reduce.unwrap_or_default(),
        })),
        None if reduce.is_some() => Err(MetadataError::Conflict(
            "`windowAggregation` needs a `window`".into(),
        )),
        None => Ok(None),
    }
}

/// `namespace`: whose pods; the ScaledObject's own unless the operator
/// allows reading another.
fn pods_namespace(
    meta: &Metadata<'_>,
    own: &str,
    allow_cross_namespace: bool,
) -> Result<String, MetadataError> {
    match meta.get("namespace") {
        Some(ns) if !metadata::is_namespace_name(ns) => {
            Err(MetadataError::invalid("namespace", ns, NAMESPACE_NAME))
        }
        Some(ns) if ns != own && !allow_cross_namespace => {
            Err(MetadataError::CrossNamespace(ns.to_owned()))
        }
        Some(ns) => Ok(ns.to_owned()),
        None => Ok(own.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testkit::meta as map;

    #[test]
    fn a_missing_target_is_refused_before_the_other_keys() {
        let m = map(&[]);
        let e = parse(
            &Metadata(&m),
            "shop",
            &crate::source::tests::settings(),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("targetValue") && e.contains("in-flight"), "{e}");
    }

    #[test]
    fn window_bounds_and_its_aggregation() {
        let max = Duration::from_secs(600);
        let w = |pairs: &[(&str, &str)]| window(&Metadata(&map(pairs)), max);
        assert_eq!(w(&[]), Ok(None));
        assert_eq!(
            w(&[("window", "10m"), ("windowAggregation", "max")]),
            Ok(Some(Window {
                length: max,
                reduce: WindowReduce::Max
            }))
        );
        assert!(
            w(&[("window", "601s")])
                .unwrap_err()
                .to_string()
                .contains("10m")
        );
        assert!(matches!(
            w(&[("windowAggregation", "avg")]),
            Err(MetadataError::Conflict(_))
        ));
    }

    #[test]
    fn pods_namespace_is_the_own_one_unless_allowed() {
        let ns =
            |pairs: &[(&str, &str)], allow| pods_namespace(&Metadata(&map(pairs)), "shop", allow);
        assert_eq!(ns(&[], false), Ok("shop".into()));
        assert_eq!(ns(&[("namespace", "shop")], false), Ok("shop".into()));
        assert_eq!(
            ns(&[("namespace", "other")], false),
            Err(MetadataError::CrossNamespace("other".into()))
        );
        assert_eq!(ns(&[("namespace", "other")], true), Ok("other".into()));
        assert!(matches!(
            ns(&[("namespace", "Other")], true),
            Err(MetadataError::Invalid { .. })
        ));
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
}
