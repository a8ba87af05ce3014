//! Prometheus-backed per-pod metrics: a rule's query template, and the query
//! one request turns it into.
//!
//! The template language is prometheus-adapter's `metricsQuery`, cut to what
//! a per-pod metric needs: `<<.LabelMatchers>>` (required) becomes the
//! request's label matchers, `<<.GroupBy>>` the rule's `pod_label`. Anything
//! else between `<<` and `>>` is refused at start-up. The matchers are, in
//! order: `namespace="<ns>"`; `<pod_label>="<name>"` for a single pod; the
//! `labelSelector` terms (rules with `pods_from: prometheus`); the
//! `metricLabelSelector` terms. (prometheus-adapter puts the names of the
//! pods it listed from the Kubernetes API where we put the selector terms:
//! activescale has no Kubernetes client yet.)
//!
//! Injection: nothing of the request is pasted as text. Matchers are built
//! from parsed terms (label keys and values already checked by the selector
//! grammar, namespace and pod names by the API), label names are checked
//! again, values are escaped for a double-quoted PromQL string (and for RE2
//! inside `=~`), and the result goes through the PromQL guard
//! ([`crate::prometheus::promql::prepare`]): parsed, pinned to the namespace
//! when `prometheus_enforce_namespace` is on, printed and re-parsed. At
//! start-up the template must parse with the placeholders expanded and each
//! `<<.LabelMatchers>>` must sit inside a selector's braces.
//!
//! Label names: a `labelSelector` key is a Kubernetes label key
//! (`app.kubernetes.io/name`); Prometheus' Kubernetes discovery exposes it
//! as `__meta_kubernetes_pod_label_app_kubernetes_io_name`, which the usual
//! `labelmap` relabelling turns into `app_kubernetes_io_name`: every
//! character other than `[A-Za-z0-9_]` becomes `_`. `metricLabelSelector`
//! keys are Prometheus label names already and are used as they are.

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, UNIX_EPOCH},
};

use crate::{
    config::{CustomMetricsRule, PodsFrom, is_prometheus_label_name},
    prometheus::{
        client::{Auth, Endpoint, Series},
        promql::{self, NAMESPACE_LABEL, Rewrite},
    },
    selector::{Requirement, Selector},
};

use super::{PodSample, api::check_dns_subdomain};

/// A rule's query timeout until [`PromRule::with_default_timeout`] sets
/// `prometheus_timeout` (its default).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

const LABEL_MATCHERS: &str = ".LabelMatchers";
const GROUP_BY: &str = ".GroupBy";

/// A rule, its template checked.
#[derive(Debug)]
pub struct PromRule {
    /// Prometheus base URL.
    pub server: String,
    /// The label naming the pod in the result.
    pub pod_label: String,
    pub window: Option<Duration>,
    pub pods_from: PodsFrom,
    pub timeout: Option<Duration>,
    /// Where its queries go: the rule's server, no credentials, its timeout.
    pub endpoint: Arc<Endpoint>,
    template: Vec<Part>,
    enforce_namespace: bool,
}

#[derive(Debug, PartialEq)]
enum Part {
    Text(String),
    LabelMatchers,
    GroupBy,
}

/// What one request asks of a rule.
#[derive(Clone, Copy, Debug, Default)]
pub struct RuleScope<'a> {
    /// A valid namespace name.
    pub namespace: &'a str,
    /// A valid pod name, for `pods/<name>`.
    pub pod: Option<&'a str>,
    /// The `labelSelector`, when the rule matches pods by their labels
    /// (`pods_from: prometheus`); `None` for `pods_from: sidecars`, whose
    /// results are kept for the sidecars' pods instead.
    pub pod_selector: Option<&'a Selector>,
    /// The `metricLabelSelector`.
    pub metric_selector: Option<&'a Selector>,
}

/// Why a request's query could not be made.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum RuleError {
    /// A selector term Prometheus cannot express (400).
    #[error("{0}")]
    Selector(String),
    /// The expanded query failed the PromQL guard (500; start-up checks make
    /// this unexpected).
    #[error("the rule's query could not be prepared: {0}")]
    Query(String),
}

impl PromRule {
    /// Checks `rule`'s template; the message says what is wrong with it.
    pub fn compile(rule: &CustomMetricsRule, enforce_namespace: bool) -> Result<Self, String> {
        let template = parse_template(&rule.query)?;
        if !template.contains(&Part::LabelMatchers) {
            return Err(format!(
                "it must contain {{<<{LABEL_MATCHERS}>>}}: the request's namespace and pods"
            ));
        }
        check_placement(&template)?;
        let compiled = Self {
            server: rule.server.clone(),
            pod_label: rule.pod_label.clone(),
            window: rule.window,
            pods_from: rule.pods_from,
            timeout: rule.timeout,
            endpoint: endpoint(&rule.server, rule.timeout.unwrap_or(DEFAULT_TIMEOUT)),
            template,
            enforce_namespace,
        };
        // Every shape of request: namespace only, one pod, selectors of
        // each kind of term.
        let pods = Selector::parse("app=probe,tier in (a,b),track notin (c),canary,!legacy,x!=y")
            .map_err(|e| e.to_string())?;
        let metric = Selector::parse("verb=GET").map_err(|e| e.to_string())?;
        for scope in [
            RuleScope {
                namespace: "default",
                ..RuleScope::default()
            },
            RuleScope {
                namespace: "default",
                pod: Some("probe-0"),
                pod_selector: Some(&pods),
                metric_selector: Some(&metric),
            },
        ] {
            compiled.query(&scope).map_err(|e| match e {
                RuleError::Query(why) | RuleError::Selector(why) => why,
            })?;
        }
        Ok(compiled)
    }

    /// The rule with `default` (`prometheus_timeout`) as its timeout when it
    /// sets none.
    pub fn with_default_timeout(mut self, default: Duration) -> Self {
        self.endpoint = endpoint(&self.server, self.timeout.unwrap_or(default));
        self
    }

    /// The query for `scope`, checked by the PromQL guard.
    pub fn query(&self, scope: &RuleScope<'_>) -> Result<String, RuleError> {
        let matchers = self.matchers(scope)?;
        let mut text = String::new();
        for part in &self.template {
            match part {
                Part::Text(t) => text.push_str(t),
                Part::LabelMatchers => text.push_str(&matchers),
                Part::GroupBy => text.push_str(&self.pod_label),
            }
        }
        promql::prepare(
            &text,
            Rewrite {
                extra: &[],
                namespace: self.enforce_namespace.then_some(scope.namespace),
            },
        )
        .map_err(RuleError::Query)
    }

    /// The text of `<<.LabelMatchers>>` for `scope`.
    fn matchers(&self, scope: &RuleScope<'_>) -> Result<String, RuleError> {
        let mut out = vec![format!("{NAMESPACE_LABEL}={}", quote(scope.namespace))];
        if let Some(pod) = scope.pod {
            out.push(format!("{}={}", self.pod_label, quote(pod)));
        }
        // Labels the rule itself sets: a selector term on them would
        // contradict (or, for namespace, escape) the request's scope.
        let reserved = |name: &str| {
            name == NAMESPACE_LABEL || name == self.pod_label || name.starts_with("__")
        };
        for (selector, what, sanitise) in [
            (scope.pod_selector, "labelSelector", true),
            (scope.metric_selector, "metricLabelSelector", false),
        ] {
            for r in selector.map(Selector::requirements).unwrap_or_default() {
                let key = key_of(r);
                let name = if sanitise {
                    sanitise_label(key)
                } else {
                    key.to_owned()
                };
                if !is_prometheus_label_name(&name) {
                    return Err(RuleError::Selector(format!(
                        "{what}: {key:?} has no Prometheus label name{}",
                        if sanitise {
                            ""
                        } else {
                            " (a metric label is [a-zA-Z_][a-zA-Z0-9_]*)"
                        }
                    )));
                }
                if reserved(&name) {
                    return Err(RuleError::Selector(format!(
                        "{what}: label {key:?} cannot be selected on: the rule sets {name:?} itself"
                    )));
                }
                out.push(matcher(&name, r));
            }
        }
        Ok(out.join(","))
    }
}

fn endpoint(server: &str, timeout: Duration) -> Arc<Endpoint> {
    Arc::new(Endpoint {
        url: server.to_owned(),
        timeout,
        unsafe_ssl: false,
        ca_pem: None,
        auth: Auth::None,
        headers: Vec::new(),
    })
}

/// A rule's result as pods: the series named by `pod_label`, with their
/// sample time. A series without that label, or whose label is no pod name,
/// is not a pod's and is skipped; the same pod twice is an error (which of
/// the two would be a guess). Values pass as they are: the API refuses a
/// NaN, infinite or negative one rather than serving it.
pub fn pods_of(series: &[Series], pod_label: &str) -> Result<Vec<PodSample>, String> {
    let mut seen = HashSet::with_capacity(series.len());
    let mut pods = Vec::with_capacity(series.len());
    for s in series {
        let Some(name) = s.labels.get(pod_label) else {
            continue;
        };
        if check_dns_subdomain(name).is_err() {
            continue;
        }
        if !seen.insert(name.as_str()) {
            return Err(format!(
                "the query returned more than one series for pod {name} (label {pod_label}); \
                 aggregate it by {pod_label}, e.g. sum by (<<.GroupBy>>) (...)"
            ));
        }
        let at = Duration::try_from_secs_f64(s.at)
            .ok()
            .and_then(|d| UNIX_EPOCH.checked_add(d))
            .ok_or_else(|| format!("pod {name}: the sample time {} is out of range", s.at))?;
        pods.push(PodSample {
            name: name.clone(),
            value: s.value,
            last_report: at,
        });
    }
    Ok(pods)
}

/// Only `names`' samples, for `pods_from: sidecars`.
pub fn keep_only(pods: &mut Vec<PodSample>, names: &HashSet<String>) {
    pods.retain(|p| names.contains(&p.name));
}

fn key_of(r: &Requirement) -> &str {
    match r {
        Requirement::Equals(k, _)
        | Requirement::NotEquals(k, _)
        | Requirement::In(k, _)
        | Requirement::NotIn(k, _)
        | Requirement::Exists(k)
        | Requirement::DoesNotExist(k) => k,
    }
}

/// The PromQL matcher with the meaning of `r` (an absent label reads as the
/// empty value in Prometheus).
fn matcher(name: &str, r: &Requirement) -> String {
    let alternatives = |vs: &[String]| {
        let escaped: Vec<String> = vs.iter().map(|v| regex_escape(v)).collect();
        quote(&escaped.join("|"))
    };
    match r {
        Requirement::Equals(_, v) => format!("{name}={}", quote(v)),
        Requirement::NotEquals(_, v) => format!("{name}!={}", quote(v)),
        Requirement::In(_, vs) => format!("{name}=~{}", alternatives(vs)),
        Requirement::NotIn(_, vs) => format!("{name}!~{}", alternatives(vs)),
        Requirement::Exists(_) => format!("{name}!=\"\""),
        Requirement::DoesNotExist(_) => format!("{name}=\"\""),
    }
}

/// What Prometheus' relabelling makes of a Kubernetes label key.
fn sanitise_label(key: &str) -> String {
    key.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `s` as a double-quoted PromQL string literal.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `s` matched literally by RE2.
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn parse_template(text: &str) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find("<<") {
        if open > 0 {
            parts.push(Part::Text(rest[..open].to_owned()));
        }
        let after = &rest[open + 2..];
        let close = after
            .find(">>")
            .ok_or_else(|| "a `<<` without its `>>`".to_string())?;
        let field = after[..close].trim();
        parts.push(match field {
            LABEL_MATCHERS => Part::LabelMatchers,
            GROUP_BY => Part::GroupBy,
            ".Series" => {
                return Err(
                    "<<.Series>> is not supported: name the series in the query itself".into(),
                );
            }
            other => {
                return Err(format!(
                    "<<{other}>> is not supported: use <<{LABEL_MATCHERS}>> and <<{GROUP_BY}>>"
                ));
            }
        });
        rest = &after[close + 2..];
    }
    if rest.contains(">>") {
        return Err("a `>>` without its `<<`".into());
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest.to_owned()));
    }
    Ok(parts)
}

/// Each `<<.LabelMatchers>>` must be a matcher list of its own inside `{}`:
/// after `{` or `,` and before `}` or `,` (spaces aside), so the matchers
/// can never land in a string, a function argument or an operator position.
fn check_placement(template: &[Part]) -> Result<(), String> {
    for (i, part) in template.iter().enumerate() {
        if *part != Part::LabelMatchers {
            continue;
        }
        let before = match i.checked_sub(1).map(|j| &template[j]) {
            Some(Part::Text(t)) => t.trim_end().chars().last(),
            _ => None,
        };
        let after = match template.get(i + 1) {
            Some(Part::Text(t)) => t.trim_start().chars().next(),
            _ => None,
        };
        if !matches!(before, Some('{' | ',')) || !matches!(after, Some('}' | ',')) {
            return Err(format!(
                "<<{LABEL_MATCHERS}>> must stand between a selector's braces, e.g. x{{<<{LABEL_MATCHERS}>>}}"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(query: &str) -> CustomMetricsRule {
        CustomMetricsRule {
            name: "rps".into(),
            server: "http://prometheus:9090".into(),
            query: query.into(),
            pod_label: "pod".into(),
            window: None,
            pods_from: PodsFrom::Prometheus,
            timeout: None,
        }
    }

    fn series(pod: Option<&str>, value: f64, at: f64) -> Series {
        Series {
            labels: pod
                .map(|p| [("pod".to_string(), p.to_string())].into())
                .unwrap_or_default(),
            value,
            at,
        }
    }

    #[test]
    fn result_to_pods() {
        let got = pods_of(
            &[
                series(Some("web-1"), 2.5, 1_767_323_045.5),
                series(None, 9.0, 1.0),
                series(Some("Not_A_Pod"), 9.0, 1.0),
                series(Some(""), 9.0, 1.0),
                series(Some("web-2"), f64::NAN, 10.0),
            ],
            "pod",
        )
        .unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].name, "web-1");
        assert_eq!(got[0].value, 2.5);
        assert_eq!(
            got[0].last_report,
            UNIX_EPOCH + Duration::from_millis(1_767_323_045_500)
        );
        // Passed on for the API to refuse, never dropped silently.
        assert_eq!(got[1].name, "web-2");
        assert!(got[1].value.is_nan());
        // Another label name: nothing of this is a pod.
        assert!(
            pods_of(&[series(Some("web-1"), 1.0, 1.0)], "pod_name")
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn a_pod_twice_or_a_bad_time_is_an_error() {
        let e = pods_of(
            &[
                series(Some("web-1"), 1.0, 1.0),
                series(Some("web-1"), 2.0, 1.0),
            ],
            "pod",
        )
        .unwrap_err();
        assert!(e.contains("more than one series for pod web-1"), "{e}");
        for at in [-1.0, f64::NAN, f64::INFINITY] {
            let e = pods_of(&[series(Some("web-1"), 1.0, at)], "pod").unwrap_err();
            assert!(e.contains("sample time"), "{at}: {e}");
        }
    }

    #[test]
    fn sidecar_pods_filter() {
        let mut pods = pods_of(
            &[series(Some("a"), 1.0, 1.0), series(Some("b"), 1.0, 1.0)],
            "pod",
        )
        .unwrap();
        keep_only(&mut pods, &["b".to_string()].into());
        assert_eq!(pods.len(), 1);
        assert_eq!(pods[0].name, "b");
    }

    const RPS: &str = "sum by (<<.GroupBy>>) (rate(http_requests_total{<<.LabelMatchers>>}[2m]))";

    fn compile(query: &str) -> Result<PromRule, String> {
        PromRule::compile(&rule(query), true)
    }

    fn sel(s: &str) -> Selector {
        Selector::parse(s).unwrap()
    }

    #[test]
    fn namespace_and_group_by() {
        let r = compile(RPS).unwrap();
        let q = r
            .query(&RuleScope {
                namespace: "shop",
                ..RuleScope::default()
            })
            .unwrap();
        assert_eq!(
            q,
            "sum by (pod) (rate(http_requests_total{namespace=\"shop\"}[2m]))"
        );
    }

    #[test]
    fn one_pod_and_both_selectors() {
        let r = compile(RPS).unwrap();
        let pods = sel("app.kubernetes.io/name=web,tier in (front,edge.v2),!legacy");
        let metric = sel("verb!=GET,code notin (500,503)");
        let q = r
            .query(&RuleScope {
                namespace: "shop",
                pod: Some("web-0"),
                pod_selector: Some(&pods),
                metric_selector: Some(&metric),
            })
            .unwrap();
        // The printer sorts matchers.
        assert_eq!(
            q,
            "sum by (pod) (rate(http_requests_total{app_kubernetes_io_name=\"web\",code!~\"500|503\",\
             legacy=\"\",namespace=\"shop\",pod=\"web-0\",tier=~\"front|edge\\\\.v2\",verb!=\"GET\"}[2m]))"
        );
    }

    #[test]
    fn selector_terms_mean_what_kubernetes_means() {
        let r = compile("x{<<.LabelMatchers>>}").unwrap();
        let q = |s: &str| {
            let s = sel(s);
            r.matchers(&RuleScope {
                namespace: "ns",
                pod_selector: Some(&s),
                ..RuleScope::default()
            })
            .unwrap()
        };
        assert_eq!(q("a=b"), r#"namespace="ns",a="b""#);
        assert_eq!(q("a==b"), r#"namespace="ns",a="b""#);
        assert_eq!(q("a!=b"), r#"namespace="ns",a!="b""#);
        assert_eq!(q("a in (b,c.d)"), r#"namespace="ns",a=~"b|c\\.d""#);
        assert_eq!(q("a notin (b)"), r#"namespace="ns",a!~"b""#);
        assert_eq!(q("a"), r#"namespace="ns",a!="""#);
        assert_eq!(q("!a"), r#"namespace="ns",a="""#);
    }

    #[test]
    fn selectors_cannot_escape_the_scope() {
        let r = compile(RPS).unwrap();
        for (pods, metric) in [
            (Some("namespace=other"), None),
            (Some("pod=someone-else"), None),
            (None, Some("namespace=other")),
            (None, Some("app.kubernetes.io/name=x")),
            (Some("1abc=x"), None),
        ] {
            let (p, m) = (pods.map(sel), metric.map(sel));
            let e = r
                .query(&RuleScope {
                    namespace: "shop",
                    pod: None,
                    pod_selector: p.as_ref(),
                    metric_selector: m.as_ref(),
                })
                .unwrap_err();
            assert!(
                matches!(e, RuleError::Selector(_)),
                "{pods:?} {metric:?}: {e}"
            );
        }
    }

    #[test]
    fn hostile_values_stay_inside_their_string() {
        // The selector grammar never lets these through; the escaping holds anyway.
        assert_eq!(
            quote(r#"a"}) or vector(1) or x{b=""#),
            r#""a\"}) or vector(1) or x{b=\"""#
        );
        assert_eq!(quote("back\\slash\nnew"), r#""back\\slash\nnew""#);
        assert_eq!(regex_escape("a.b|c*"), r"a\.b\|c\*");
        let r = compile("x{<<.LabelMatchers>>}").unwrap();
        let q = r
            .query(&RuleScope {
                namespace: "shop",
                pod: Some("p\"}) or vector(1"),
                ..RuleScope::default()
            })
            .unwrap();
        assert_eq!(q, "x{namespace=\"shop\",pod=\"p\\\"}) or vector(1\"}");
    }

    #[test]
    fn other_namespaces_are_refused_with_enforcement() {
        let e = compile(
            "sum by (pod) (x{<<.LabelMatchers>>}) / on() group_left sum(y{namespace=\"other\"})",
        )
        .unwrap_err();
        assert!(e.contains("another namespace"), "{e}");
        // Without enforcement the operator may read elsewhere on purpose.
        let mut r = rule(
            "sum by (pod) (x{<<.LabelMatchers>>}) / on() group_left sum(y{namespace=\"other\"})",
        );
        r.pods_from = PodsFrom::Sidecars;
        PromRule::compile(&r, false).unwrap();
    }

    #[test]
    fn templates_are_checked_at_start_up() {
        for (query, needle) in [
            ("sum(x)", "must contain"),
            ("x{<<.Series>>}", "Series"),
            ("x{<<.Labels>>}", "not supported"),
            ("x{<<.LabelMatchers}", "without its"),
            ("x{<<.LabelMatchers>>} >> 2", "without its"),
            ("x{a=\"<<.LabelMatchers>>\"}", "between a selector's braces"),
            (
                "label_replace(x, \"d\", \"<<.LabelMatchers>>\", \"s\", \"(.*)\")",
                "braces",
            ),
            ("x + <<.LabelMatchers>>", "braces"),
            ("rate(x{<<.LabelMatchers>>}[5m]", "not valid PromQL"),
            ("x{<<.LabelMatchers>>}[5m]", "matrix"),
        ] {
            let e = compile(query).unwrap_err();
            assert!(e.contains(needle), "{query}: {e}");
        }
        // Spaces inside the delimiters and other matchers beside them are fine.
        let r = compile("sum by (<< .GroupBy >>) (x{ << .LabelMatchers >> , container!=\"POD\"})")
            .unwrap();
        let q = r
            .query(&RuleScope {
                namespace: "ns",
                ..RuleScope::default()
            })
            .unwrap();
        assert_eq!(q, "sum by (pod) (x{container!=\"POD\",namespace=\"ns\"})");
    }
}
