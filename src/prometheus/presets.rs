//! Named worker formulas (`preset`), reproduced exactly from the workers
//! they scale:
//!
//! | preset | value | target |
//! |---|---|---|
//! | `membrane-instant-tasks` | `sum(instant_tasks_jobs_active) + sum(instant_tasks_jobs_waiting)` | `jobsPerWorker` (5) |
//! | `membrane-queued-tasks` | `max(queued_tasks_workers_required) * (1 + bufferRatio)` (0.3) | 1 |
//! | `membrane-capacity` | `(sum(custom_code_runner_total_job_spaces) - sum(custom_code_runner_remaining_job_spaces)) / sum(custom_code_runner_total_job_spaces)` | `capacityTarget` (0.45) |
//!
//! Each preset is a set of named queries and a [`formula`](super::formula)
//! over them, so the arithmetic is the same IEEE arithmetic PromQL would do,
//! in the same order, and `ignoreNullValues` applies to each series read.
//! `membrane-capacity` is a utilisation ratio: the ScaledObject must set
//! `metricType: Value`, or the HPA multiplies it by the replica count.

use crate::metadata::{Metadata, MetadataError, invalid_excerpt};

/// Preset parameter keys (besides `preset` and `selector`).
pub const PARAM_KEYS: &[&str] = &["jobsPerWorker", "bufferRatio", "capacityTarget"];

/// Names accepted by `preset`.
pub const NAMES: &[&str] = &[
    "membrane-instant-tasks",
    "membrane-queued-tasks",
    "membrane-capacity",
];

/// A preset expanded into queries and a formula.
#[derive(Debug, PartialEq)]
pub struct Expanded {
    /// (name, PromQL) pairs, before any selector or namespace is added.
    pub queries: Vec<(&'static str, &'static str)>,
    pub formula: String,
    pub default_target: f64,
    pub metric_name: &'static str,
    /// Whether the value is a ratio that needs `metricType: Value`.
    pub is_ratio: bool,
}

/// Expands preset `name` with its parameters from `meta`. Parameters of
/// another preset are refused, not ignored.
pub fn expand(name: &str, meta: &Metadata<'_>) -> Result<Expanded, MetadataError> {
    let own: &[&str] = match name {
        "membrane-instant-tasks" => &["jobsPerWorker"],
        "membrane-queued-tasks" => &["bufferRatio"],
        "membrane-capacity" => &["capacityTarget"],
        _ => {
            return Err(invalid_excerpt(
                "preset",
                name,
                format!("one of {}", NAMES.join(", ")),
            ));
        }
    };
    if let Some(k) = PARAM_KEYS
        .iter()
        .find(|k| !own.contains(k) && meta.get(k).is_some())
    {
        return Err(MetadataError::Conflict(format!(
            "`{k}` is not a parameter of preset `{name}` (its parameters: {}, selector)",
            own.join(", ")
        )));
    }
    let expanded = match name {
        "membrane-instant-tasks" => Expanded {
            queries: vec![
                ("active", "sum(instant_tasks_jobs_active)"),
                ("waiting", "sum(instant_tasks_jobs_waiting)"),
            ],
            formula: "active + waiting".into(),
            default_target: meta
                .number("jobsPerWorker", Some((0.0, true)))?
                .unwrap_or(5.0),
            metric_name: "membrane_instant_tasks",
            is_ratio: false,
        },
        "membrane-queued-tasks" => {
            let ratio = meta
                .number("bufferRatio", Some((0.0, false)))?
                .unwrap_or(0.3);
            Expanded {
                queries: vec![("required", "max(queued_tasks_workers_required)")],
                // `{:?}` prints the shortest text that parses back to the same f64.
                formula: format!("required * (1 + {ratio:?})"),
                default_target: 1.0,
                metric_name: "membrane_queued_tasks",
                is_ratio: false,
            }
        }
        _ => {
            let target = meta
                .number("capacityTarget", Some((0.0, true)))?
                .unwrap_or(0.45);
            if target > 1.0 {
                return Err(MetadataError::invalid(
                    "capacityTarget",
                    meta.get("capacityTarget").unwrap_or_default(),
                    "a utilisation ratio greater than 0 and at most 1",
                ));
            }
            Expanded {
                queries: vec![
                    ("total", "sum(custom_code_runner_total_job_spaces)"),
                    ("remaining", "sum(custom_code_runner_remaining_job_spaces)"),
                ],
                formula: "(total - remaining) / total".into(),
                default_target: target,
                metric_name: "membrane_capacity",
                is_ratio: true,
            }
        }
    };
    // A per-trigger targetValue wins (trigger.rs); giving both a different
    // target parameter and targetValue is a contradiction, not a preference.
    if let (Some(k), Some(tv)) = (
        own.iter().find(|k| meta.get(k).is_some()),
        meta.number("targetValue", None)?,
    ) && *k != "bufferRatio"
        && tv != expanded.default_target
    {
        return Err(MetadataError::Conflict(format!(
            "`{k}` and `targetValue` both set the target and disagree; give one"
        )));
    }
    Ok(expanded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{prometheus::formula::Formula, testkit::meta};

    fn run(name: &str, pairs: &[(&str, &str)], values: &[f64]) -> (f64, f64) {
        let m = meta(pairs);
        let e = expand(name, &Metadata(&m)).unwrap();
        let names: Vec<&str> = e.queries.iter().map(|(n, _)| *n).collect();
        let v = Formula::parse(&e.formula, &names)
            .unwrap()
            .eval(values)
            .unwrap();
        (v, e.default_target)
    }

    #[test]
    fn formulas_and_defaults() {
        assert_eq!(run("membrane-instant-tasks", &[], &[7.0, 4.0]), (11.0, 5.0));
        assert_eq!(
            run(
                "membrane-instant-tasks",
                &[("jobsPerWorker", "8")],
                &[1.0, 2.0]
            ),
            (3.0, 8.0)
        );
        assert_eq!(
            run("membrane-queued-tasks", &[], &[10.0]),
            (10.0 * (1.0 + 0.3), 1.0)
        );
        assert_eq!(
            run("membrane-queued-tasks", &[("bufferRatio", "0.5")], &[4.0]),
            (6.0, 1.0)
        );
        assert_eq!(
            run("membrane-queued-tasks", &[("bufferRatio", "0")], &[4.0]),
            (4.0, 1.0)
        );
        assert_eq!(run("membrane-capacity", &[], &[8.0, 2.0]), (0.75, 0.45));
        assert_eq!(
            run(
                "membrane-capacity",
                &[("capacityTarget", "0.6")],
                &[10.0, 7.0]
            ),
            ((10.0 - 7.0) / 10.0, 0.6)
        );
    }

    #[test]
    fn buffer_ratio_text_round_trips_exactly() {
        for r in ["0.1", "0.3", "0.7", "1e-7", "123.456"] {
            let ratio: f64 = r.parse().unwrap();
            let (v, _) = run("membrane-queued-tasks", &[("bufferRatio", r)], &[3.0]);
            assert_eq!(v, 3.0 * (1.0 + ratio), "{r}");
        }
    }

    #[test]
    fn refusals_name_the_key() {
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a [&'a str]);
        let cases: &[Case] = &[
            (
                "membrane-nope",
                &[],
                &["preset", "membrane-nope", "membrane-capacity"],
            ),
            (
                "membrane-capacity",
                &[("capacityTarget", "45")],
                &["capacityTarget", "at most 1"],
            ),
            (
                "membrane-capacity",
                &[("capacityTarget", "0")],
                &["capacityTarget"],
            ),
            (
                "membrane-instant-tasks",
                &[("jobsPerWorker", "-1")],
                &["jobsPerWorker"],
            ),
            (
                "membrane-queued-tasks",
                &[("bufferRatio", "-0.1")],
                &["bufferRatio"],
            ),
            (
                "membrane-instant-tasks",
                &[("bufferRatio", "0.2")],
                &["bufferRatio", "not a parameter", "jobsPerWorker"],
            ),
            (
                "membrane-instant-tasks",
                &[("jobsPerWorker", "5"), ("targetValue", "3")],
                &["jobsPerWorker", "targetValue"],
            ),
        ];
        for (name, pairs, needles) in cases {
            let m = meta(pairs);
            let e = expand(name, &Metadata(&m)).unwrap_err().to_string();
            for n in *needles {
                assert!(
                    e.contains(n),
                    "{name} {pairs:?}: {e:?} should mention {n:?}"
                );
            }
        }
        let m = meta(&[("jobsPerWorker", "5"), ("targetValue", "5")]);
        assert!(
            expand("membrane-instant-tasks", &Metadata(&m)).is_ok(),
            "agreeing values are fine"
        );
    }
}
