//! `activescale check FILE...`: validates the activescale triggers of
//! ScaledObjects (and ScaledJobs) in Kubernetes YAML, offline, with the very
//! parser the server runs ([`trigger::parse`]), so what passes here is what
//! KEDA's first `GetMetricSpec` will accept.
//!
//! Which triggers are ours: `type: external` or `external-push` whose
//! `scalerAddress` matches one of the `--scaler-address` globs (default
//! `*activescale*`, i.e. a Service name containing `activescale`). Other
//! external triggers are listed as skipped, never silently passed; other
//! trigger types are not ours and are ignored.
//!
//! Output: one line per trigger (ok, error or skipped), plus one line per
//! warning, each starting with `FILE doc N` (documents counted from 1) and
//! naming the object and the trigger index (`triggers[0]`, as in KEDA's
//! `s0-` metric prefix). Warnings flag what is valid but likely wrong: a ratio
//! preset without `metricType: Value`, and a `labelSelector` that matches none
//! of the pod labels of the ScaledObject's target when the target is in the
//! files too.

use std::{collections::HashMap, fmt, io, io::Read};

use serde::Deserialize;
use serde_yaml::Value;

use crate::{
    config::Config,
    selector::{Labels, Selector},
    sink::names::NameFilter,
    trigger::{self, TriggerSettings},
};

/// The `--scaler-address` default: a Service whose name contains `activescale`.
pub const DEFAULT_SCALER_ADDRESS: &str = "*activescale*";

/// Presets whose value is a utilisation ratio: with KEDA's default
/// `metricType: AverageValue` the HPA divides it by the replica count.
pub const RATIO_PRESETS: &[&str] = &["membrane-capacity"];

const KEDA_API: &str = "keda.sh/v1alpha1";
const TRIGGER_TYPES: &[&str] = &["external", "external-push"];

/// What to check and how.
pub struct Options {
    /// Globs over a trigger's `scalerAddress`; a match makes the trigger ours.
    scaler_address: NameFilter,
    patterns: Vec<String>,
    settings: TriggerSettings,
    /// Metric names the Custom Metrics API serves with this config.
    custom_metrics: Vec<String>,
}

impl Options {
    /// `patterns` as given to `--scaler-address` (empty: the default);
    /// trigger limits (`max_window`, `allow_cross_namespace`) from `config`.
    pub fn new(patterns: &[String], config: &Config) -> Self {
        let patterns = if patterns.is_empty() {
            vec![DEFAULT_SCALER_ADDRESS.to_string()]
        } else {
            patterns.to_vec()
        };
        Self {
            scaler_address: NameFilter::new(&patterns, &[], None),
            patterns,
            settings: trigger_settings(config),
            custom_metrics: crate::custom_metrics::Catalogue::from_config(config)
                .map(|c| c.iter().map(|m| m.name.clone()).collect())
                .unwrap_or_else(|_| vec![crate::config::ACTIVE_REQUESTS.to_string()]),
        }
    }
}

/// The settings `run` gives the trigger cache, from the same config fields.
fn trigger_settings(config: &Config) -> TriggerSettings {
    TriggerSettings {
        max_window: config.engine.max_window,
        allow_cross_namespace: config.engine.allow_cross_namespace,
        prometheus: config.prometheus.clone(),
    }
}

/// One input: its name as given (`-` is stdin) and its text.
pub struct Input {
    pub name: String,
    pub text: io::Result<String>,
}

/// Reads every path; `-` reads standard input. Failures are kept and
/// reported per file, so one unreadable file does not hide the others.
pub fn read_inputs(paths: &[String]) -> Vec<Input> {
    paths
        .iter()
        .map(|path| {
            let text = if path == "-" {
                let mut s = String::new();
                io::stdin().read_to_string(&mut s).map(|_| s)
            } else {
                std::fs::read_to_string(path)
            };
            Input {
                name: if path == "-" {
                    "<stdin>".into()
                } else {
                    path.clone()
                },
                text,
            }
        })
        .collect()
}

/// The outcome of one check.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Ok,
    Error(String),
    Warning(String),
    /// An external trigger that is not aimed at activescale.
    Skipped(String),
}

/// One output line.
#[derive(Clone, Debug, PartialEq)]
pub struct Finding {
    /// `FILE doc N: ScaledObject NS/NAME triggers[I] (TYPE)`, or less when
    /// the problem is the file or the document itself.
    pub location: String,
    pub verdict: Verdict,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.verdict {
            Verdict::Ok => write!(f, "{}: ok", self.location),
            Verdict::Error(e) => write!(f, "{}: error: {e}", self.location),
            Verdict::Warning(w) => write!(f, "{}: warning: {w}", self.location),
            Verdict::Skipped(why) => write!(f, "{}: skipped: {why}", self.location),
        }
    }
}

/// Everything one run found.
#[derive(Debug, Default)]
pub struct Report {
    pub findings: Vec<Finding>,
    /// ScaledObjects and ScaledJobs seen.
    pub objects: usize,
}

impl Report {
    /// True when anything is an error: the exit status is then non-zero.
    pub fn failed(&self) -> bool {
        self.findings
            .iter()
            .any(|f| matches!(f.verdict, Verdict::Error(_)))
    }

    fn count(&self, what: fn(&Verdict) -> bool) -> usize {
        self.findings.iter().filter(|f| what(&f.verdict)).count()
    }

    /// The closing line.
    pub fn summary(&self) -> String {
        let ok = self.count(|v| matches!(v, Verdict::Ok));
        let errors = self.count(|v| matches!(v, Verdict::Error(_)));
        let warnings = self.count(|v| matches!(v, Verdict::Warning(_)));
        let skipped = self.count(|v| matches!(v, Verdict::Skipped(_)));
        if ok + errors + skipped == 0 {
            return format!(
                "no activescale trigger found ({} ScaledObjects/ScaledJobs)",
                self.objects
            );
        }
        format!(
            "{} ScaledObjects/ScaledJobs: {ok} ok, {errors} errors, {warnings} warnings, {skipped} skipped",
            self.objects
        )
    }
}

/// One Kubernetes object and where it came from.
struct Doc<'a> {
    location: String,
    value: &'a Value,
}

/// Checks every activescale trigger in `inputs`.
pub fn check(inputs: &[Input], options: &Options) -> Report {
    let mut report = Report::default();
    let mut parsed: Vec<(String, Vec<Value>)> = Vec::new();
    for input in inputs {
        match &input.text {
            Ok(text) => match documents(text) {
                Ok(docs) => parsed.push((input.name.clone(), docs)),
                Err((index, e)) => report.findings.push(Finding {
                    location: format!("{} doc {index}", input.name),
                    verdict: Verdict::Error(format!("not valid YAML: {e}")),
                }),
            },
            Err(e) => report.findings.push(Finding {
                location: input.name.clone(),
                verdict: Verdict::Error(format!("cannot read: {e}")),
            }),
        }
    }
    let docs: Vec<Doc> = parsed
        .iter()
        .flat_map(|(name, values)| {
            values
                .iter()
                .enumerate()
                .flat_map(move |(i, value)| objects(format!("{name} doc {}", i + 1), value))
        })
        .collect();
    let workloads = pod_templates(&docs);
    for doc in &docs {
        let kind = str_at(doc.value, &["kind"]).unwrap_or_default();
        if kind == "HorizontalPodAutoscaler"
            && str_at(doc.value, &["apiVersion"]).is_some_and(|v| v.starts_with("autoscaling/"))
        {
            check_hpa(doc, options, &mut report.findings);
            continue;
        }
        if str_at(doc.value, &["apiVersion"]) != Some(KEDA_API)
            || !matches!(kind, "ScaledObject" | "ScaledJob")
        {
            continue;
        }
        report.objects += 1;
        check_object(doc, kind, &workloads, options, &mut report.findings);
    }
    report
}

/// The documents of a multi-document YAML text; empty documents are kept
/// (as null) so that document numbers match what an editor shows.
fn documents(text: &str) -> Result<Vec<Value>, (usize, serde_yaml::Error)> {
    let mut docs = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        // After a syntax error the parser cannot find the next document.
        docs.push(Value::deserialize(de).map_err(|e| (i + 1, e))?);
    }
    Ok(docs)
}

/// The object of a document, or the items of a `kind: List` (what
/// `kubectl get -o yaml` prints).
fn objects(location: String, value: &Value) -> Vec<Doc<'_>> {
    match value.get("items").and_then(Value::as_sequence) {
        Some(items) if str_at(value, &["kind"]).is_some_and(|k| k.ends_with("List")) => items
            .iter()
            .enumerate()
            .map(|(i, item)| Doc {
                location: format!("{location} items[{i}]"),
                value: item,
            })
            .collect(),
        _ => vec![Doc { location, value }],
    }
}

/// (kind, namespace, name) of every object with a pod template, and the
/// template's labels.
fn pod_templates(docs: &[Doc]) -> HashMap<(String, String, String), Labels> {
    docs.iter()
        .filter_map(|d| {
            let labels = d
                .value
                .get("spec")?
                .get("template")?
                .get("metadata")?
                .get("labels")?;
            let labels: Labels = labels
                .as_mapping()?
                .iter()
                .filter_map(|(k, v)| Some((k.as_str()?.to_owned(), scalar(v)?)))
                .collect();
            Some((
                (
                    str_at(d.value, &["kind"])?.to_owned(),
                    namespace_of(d.value).to_owned(),
                    str_at(d.value, &["metadata", "name"])?.to_owned(),
                ),
                labels,
            ))
        })
        .collect()
}

fn check_object(
    doc: &Doc,
    kind: &str,
    workloads: &HashMap<(String, String, String), Labels>,
    options: &Options,
    out: &mut Vec<Finding>,
) {
    let namespace = namespace_of(doc.value);
    let name = str_at(doc.value, &["metadata", "name"]).unwrap_or("<unnamed>");
    let object = format!("{} {kind} {namespace}/{name}", doc.location);
    let Some(triggers) = doc.value.get("spec").and_then(|s| s.get("triggers")) else {
        return;
    };
    let Some(triggers) = triggers.as_sequence() else {
        out.push(Finding {
            location: object,
            verdict: Verdict::Error("spec.triggers is not a list".into()),
        });
        return;
    };
    // The pod labels of the scale target, when it is among the files.
    let target = (kind == "ScaledObject")
        .then(|| {
            let target_kind =
                str_at(doc.value, &["spec", "scaleTargetRef", "kind"]).unwrap_or("Deployment");
            let target_name = str_at(doc.value, &["spec", "scaleTargetRef", "name"])?;
            let key = (
                target_kind.to_owned(),
                namespace.to_owned(),
                target_name.to_owned(),
            );
            workloads
                .get(&key)
                .map(|labels| (format!("{target_kind} {namespace}/{target_name}"), labels))
        })
        .flatten();

    for (i, t) in triggers.iter().enumerate() {
        let ty = str_at(t, &["type"]).unwrap_or_default();
        if !TRIGGER_TYPES.contains(&ty) {
            continue;
        }
        let location = format!("{object} triggers[{i}] ({ty})");
        let verdict = |verdict| Finding {
            location: location.clone(),
            verdict,
        };
        let metadata = match metadata(t.get("metadata")) {
            Ok(m) => m,
            Err(e) => {
                out.push(verdict(Verdict::Error(e)));
                continue;
            }
        };
        match metadata.get("scalerAddress").map(|a| a.trim()) {
            None | Some("") => {
                out.push(verdict(Verdict::Skipped(
                    "no `scalerAddress`, so not aimed at activescale".into(),
                )));
                continue;
            }
            Some(address) if !options.scaler_address.keeps(address.as_bytes()) => {
                out.push(verdict(Verdict::Skipped(format!(
                    "scalerAddress {address:?} does not match {} (see --scaler-address)",
                    options.patterns.join(" or ")
                ))));
                continue;
            }
            Some(_) => {}
        }
        out.push(verdict(
            match trigger::parse(namespace, &metadata, &options.settings) {
                Ok(_) => Verdict::Ok,
                Err(e) => Verdict::Error(e.to_string()),
            },
        ));
        let metric_type = str_at(t, &["metricType"]);
        if let Some(w) = ratio_without_value(&metadata, metric_type) {
            out.push(verdict(Verdict::Warning(w)));
        }
        if let Some((what, labels)) = &target
            && let Some(w) = selector_misses(&metadata, namespace, what, labels)
        {
            out.push(verdict(Verdict::Warning(w)));
        }
    }
}

/// A plain HPA's `type: Pods` metrics: each must be one the Custom Metrics
/// API serves (`active_requests` and the configured forms), read as an
/// average per pod. Other metric types are not ours and pass silently.
fn check_hpa(doc: &Doc, options: &Options, out: &mut Vec<Finding>) {
    let namespace = namespace_of(doc.value);
    let name = str_at(doc.value, &["metadata", "name"]).unwrap_or("<unnamed>");
    let object = format!(
        "{} HorizontalPodAutoscaler {namespace}/{name}",
        doc.location
    );
    let Some(metrics) = doc.value.get("spec").and_then(|s| s.get("metrics")) else {
        return;
    };
    let Some(metrics) = metrics.as_sequence() else {
        out.push(Finding {
            location: object,
            verdict: Verdict::Error("spec.metrics is not a list".into()),
        });
        return;
    };
    for (i, m) in metrics.iter().enumerate() {
        if str_at(m, &["type"]) != Some("Pods") {
            continue;
        }
        let location = format!("{object} metrics[{i}] (Pods)");
        // autoscaling/v2: pods.metric.name; v2beta1: pods.metricName.
        let metric = str_at(m, &["pods", "metric", "name"]).or(str_at(m, &["pods", "metricName"]));
        let verdict = match metric {
            None => Verdict::Error("pods.metric.name is missing".into()),
            Some(n) if !options.custom_metrics.iter().any(|s| s == n) => Verdict::Error(format!(
                "metric {n:?} is not served by activescale's Custom Metrics API (it serves: {})",
                options.custom_metrics.join(", ")
            )),
            Some(_) => match str_at(m, &["pods", "target", "type"]) {
                Some("AverageValue") | None => Verdict::Ok,
                Some(other) => Verdict::Warning(format!(
                    "target type {other}: Pods metrics are averaged per pod; use AverageValue"
                )),
            },
        };
        out.push(Finding { location, verdict });
    }
}

/// A ratio preset read as `AverageValue` (KEDA's default): the HPA would
/// divide the ratio by the replica count.
fn ratio_without_value(
    metadata: &HashMap<String, String>,
    metric_type: Option<&str>,
) -> Option<String> {
    let preset = metadata.get("preset")?.trim();
    let ratio = RATIO_PRESETS
        .iter()
        .find(|p| p.eq_ignore_ascii_case(preset))?;
    if metric_type == Some("Value") {
        return None;
    }
    let now = match metric_type {
        Some(t) => format!("it is {t}"),
        None => "unset, so AverageValue".into(),
    };
    Some(format!(
        "preset `{ratio}` is a utilisation ratio: set `metricType: Value` on this trigger \
         ({now}), or the HPA divides the ratio by the replica count and mis-scales"
    ))
}

/// An envoy-source `labelSelector` that matches none of the target's pod
/// labels: the trigger would count no pods of the workload it scales.
fn selector_misses(
    metadata: &HashMap<String, String>,
    namespace: &str,
    target: &str,
    labels: &Labels,
) -> Option<String> {
    let source = metadata.get("source").map(|s| s.trim()).unwrap_or("envoy");
    if !source.eq_ignore_ascii_case("envoy") {
        return None;
    }
    // Reading another namespace's pods is deliberate; the target says nothing.
    if metadata
        .get("namespace")
        .is_some_and(|ns| ns.trim() != namespace && !ns.trim().is_empty())
    {
        return None;
    }
    let raw = metadata.get("labelSelector")?.trim();
    let selector = Selector::parse(raw).ok()?;
    if selector.matches(labels) {
        return None;
    }
    let shown: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    Some(format!(
        "labelSelector `{raw}` does not match the pod labels of {target} ({}): \
         the trigger would count none of its pods",
        if shown.is_empty() {
            "none".into()
        } else {
            shown.join(",")
        }
    ))
}

/// The trigger metadata as Kubernetes stores it: a map of strings. A bare
/// number or boolean is refused by the API server, so it is an error here.
fn metadata(value: Option<&Value>) -> Result<HashMap<String, String>, String> {
    let Some(value) = value else {
        return Ok(HashMap::new());
    };
    if value.is_null() {
        return Ok(HashMap::new());
    }
    let map = value
        .as_mapping()
        .ok_or_else(|| "`metadata` is not a map of strings".to_string())?;
    map.iter()
        .map(|(k, v)| {
            let key = scalar(k).ok_or_else(|| "`metadata` has a key that is not a string".to_string())?;
            let value = match v {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                Value::Number(_) | Value::Bool(_) => {
                    let text = scalar(v).unwrap_or_default();
                    return Err(format!(
                        "metadata `{key}` is the bare YAML value {text}; Kubernetes accepts only strings \
                         in trigger metadata: quote it (\"{text}\")"
                    ));
                }
                _ => return Err(format!("metadata `{key}` is not a string")),
            };
            Ok((key, value))
        })
        .collect()
}

/// A scalar as text (label values are often written unquoted).
fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn str_at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(value, |v, key| v.get(key))?.as_str()
}

fn namespace_of(value: &Value) -> &str {
    str_at(value, &["metadata", "namespace"])
        .filter(|ns| !ns.is_empty())
        .unwrap_or("default")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::labels;

    fn run(text: &str) -> Report {
        let inputs = [Input {
            name: "f.yaml".into(),
            text: Ok(text.into()),
        }];
        check(&inputs, &Options::new(&[], &Config::default()))
    }

    fn lines(r: &Report) -> Vec<String> {
        r.findings.iter().map(ToString::to_string).collect()
    }

    const SO: &str = r#"
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata: {name: web, namespace: shop}
spec:
  scaleTargetRef: {name: web}
  triggers:
    - type: cpu
      metadata: {value: "50"}
    - type: external-push
      metadata:
        scalerAddress: activescale.keda:9090
        labelSelector: app=web
        targetValue: "10"
"#;

    #[test]
    fn a_valid_trigger_is_one_ok_line() {
        let r = run(SO);
        assert_eq!(
            lines(&r),
            ["f.yaml doc 1 ScaledObject shop/web triggers[1] (external-push): ok"]
        );
        assert!(!r.failed());
        assert_eq!(r.objects, 1);
    }

    #[test]
    fn scaled_jobs_are_checked_too() {
        let r = run(&SO.replace("kind: ScaledObject", "kind: ScaledJob"));
        assert_eq!(
            lines(&r),
            ["f.yaml doc 1 ScaledJob shop/web triggers[1] (external-push): ok"]
        );
    }

    #[test]
    fn parser_errors_are_reported_verbatim() {
        let r = run(&SO.replace("targetValue: \"10\"", "targetValue: \"ten\""));
        assert!(r.failed());
        let expected = trigger::parse(
            "shop",
            &[("labelSelector", "app=web"), ("targetValue", "ten")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            &trigger_settings(&Config::default()),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            lines(&r),
            [format!(
                "f.yaml doc 1 ScaledObject shop/web triggers[1] (external-push): error: {expected}"
            )]
        );
    }

    #[test]
    fn bare_numbers_in_metadata_are_errors() {
        let r = run(&SO.replace("targetValue: \"10\"", "targetValue: 10"));
        assert!(r.failed());
        assert!(
            lines(&r)[0].contains("`targetValue` is the bare YAML value 10"),
            "{:?}",
            lines(&r)
        );
    }

    #[test]
    fn other_scalers_are_skipped_not_passed() {
        let r = run(&SO.replace(
            "activescale.keda:9090",
            "keda-add-ons-http-external-scaler:9090",
        ));
        assert!(!r.failed());
        assert!(
            matches!(r.findings[0].verdict, Verdict::Skipped(_)),
            "{:?}",
            lines(&r)
        );
        let inputs = [Input {
            name: "f.yaml".into(),
            text: Ok(SO.replace("activescale.keda:9090", "scaler.keda:9090")),
        }];
        let r = check(
            &inputs,
            &Options::new(&["scaler.*".into()], &Config::default()),
        );
        assert_eq!(r.findings[0].verdict, Verdict::Ok);
    }

    #[test]
    fn ratio_preset_warning() {
        let m: HashMap<String, String> =
            [("preset".to_string(), "membrane-capacity".to_string())].into();
        assert!(
            ratio_without_value(&m, None)
                .unwrap()
                .contains("metricType: Value")
        );
        assert!(
            ratio_without_value(&m, Some("AverageValue"))
                .unwrap()
                .contains("it is AverageValue")
        );
        assert_eq!(ratio_without_value(&m, Some("Value")), None);
        let m: HashMap<String, String> =
            [("preset".to_string(), "membrane-queued-tasks".to_string())].into();
        assert_eq!(ratio_without_value(&m, None), None);
    }

    #[test]
    fn selector_warning_only_when_it_misses() {
        let m = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let pods = labels(&[("app", "web"), ("tier", "front")]);
        let hit = m(&[("labelSelector", "app=web")]);
        assert_eq!(
            selector_misses(&hit, "shop", "Deployment shop/web", &pods),
            None
        );
        let miss = m(&[("labelSelector", "app=webapp")]);
        let w = selector_misses(&miss, "shop", "Deployment shop/web", &pods).unwrap();
        assert!(
            w.contains("app=webapp") && w.contains("app=web,tier=front"),
            "{w}"
        );
        let elsewhere = m(&[("labelSelector", "app=webapp"), ("namespace", "other")]);
        assert_eq!(
            selector_misses(&elsewhere, "shop", "Deployment shop/web", &pods),
            None
        );
        let prom = m(&[("labelSelector", "app=webapp"), ("source", "prometheus")]);
        assert_eq!(
            selector_misses(&prom, "shop", "Deployment shop/web", &pods),
            None
        );
    }

    #[test]
    fn documents_count_from_one_and_keep_empty_ones() {
        let docs = documents("---\na: 1\n---\n---\nb: 2\n").unwrap();
        assert_eq!(docs.len(), 3);
        assert!(docs[1].is_null());
        let (index, _) = documents("a: 1\n---\nb: [\n").unwrap_err();
        assert_eq!(index, 2);
    }

    #[test]
    fn list_items_are_objects() {
        let list = format!(
            "apiVersion: v1\nkind: List\nitems:\n{}",
            SO.trim_start()
                .lines()
                .enumerate()
                .map(|(i, l)| if i == 0 {
                    format!("- {l}\n")
                } else {
                    format!("  {l}\n")
                })
                .collect::<String>()
        );
        let r = run(&list);
        assert_eq!(r.objects, 1);
        assert!(
            lines(&r)[0].starts_with("f.yaml doc 1 items[0] ScaledObject shop/web"),
            "{:?}",
            lines(&r)
        );
    }

    const HPA: &str = r#"
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata: {name: web, namespace: shop}
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: web}
  metrics:
    - type: Resource
      resource: {name: cpu, target: {type: Utilization, averageUtilization: 80}}
    - type: Pods
      pods:
        metric: {name: active_requests}
        target: {type: AverageValue, averageValue: "10"}
"#;

    #[test]
    fn hpas_naming_served_metrics_pass_and_others_are_flagged() {
        assert_eq!(
            lines(&run(HPA)),
            ["f.yaml doc 1 HorizontalPodAutoscaler shop/web metrics[1] (Pods): ok"]
        );
        let unknown = run(&HPA.replace("name: active_requests", "name: queue_depth"));
        assert!(unknown.failed());
        let line = &lines(&unknown)[0];
        assert!(
            line.contains("\"queue_depth\" is not served") && line.contains("active_requests"),
            "{line}"
        );
        let value = run(&HPA.replace("type: AverageValue, averageValue", "type: Value, value"));
        assert!(
            lines(&value)[0].contains("warning: target type Value"),
            "{:?}",
            lines(&value)
        );
    }
}
